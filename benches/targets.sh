#!/usr/bin/env bash
# Measures the performance targets of docs/performance.md in one run, on the file system
# holding DIR, and prints one line per figure. Usage: benches/targets.sh DIR [RUNS]
# Needs a release build (cargo build --release); the raft-engine peer run needs its own
# build (see benches/peer-raft-engine/README.md) and is skipped when absent.
set -euo pipefail
dir=${1:?usage: benches/targets.sh DIR [RUNS]}
runs=${2:-5}
here=$(cd "$(dirname "$0")/.." && pwd)
bin=$here/target/release/churnlog
mkdir -p "$dir"
j() { python3 -c "import json,sys; d=json.load(sys.stdin); print(' '.join(str(round(d[k],3)) if isinstance(d[k],float) else str(d[k]) for k in sys.argv[1:]))" "$@"; }
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

echo "# 1. durable ingest, 64 KiB incompressible, 225 streams, vs device (same run), $runs runs"
: > "$dir/t1"
for i in $(seq "$runs"); do
  rm -rf "$dir/c"
  "$bin" bench ingest --dir "$dir/c" --bytes 2GiB --record-size 64KiB --streams 225 --compare-device --json \
    | j backend mib_per_s device_limit_mib_per_s ratio_to_device ack_latency_us_p99 | tee -a "$dir/t1"
done
max=$(awk '{print $2}' "$dir/t1" | median)
echo "median ingest $max MiB/s; median device $(awk '{print $3}' "$dir/t1" | median) MiB/s; median ratio $(awk '{print $4}' "$dir/t1" | median)"

echo "# 2. compressible 2:1 (logical MiB/s vs device), $runs runs"
: > "$dir/t2"
for i in $(seq "$runs"); do
  rm -rf "$dir/c"
  "$bin" bench ingest --dir "$dir/c" --bytes 8GiB --record-size 64KiB --streams 225 --compressible 2 --compare-device --json \
    | j mib_per_s device_mib_per_s device_limit_mib_per_s ratio_to_device | tee -a "$dir/t2"
done
echo "median ratio $(awk '{print $4}' "$dir/t2" | median)"

half=$(python3 -c "print(round($max/2))")
echo "# 3. ack latency at half the maximum load ($half MiB/s), $runs runs: p50 p99 p999 us"
: > "$dir/t3"
for i in $(seq "$runs"); do
  rm -rf "$dir/c"
  "$bin" bench ingest --dir "$dir/c" --bytes 2GiB --record-size 64KiB --streams 225 --rate "$half" --json \
    | j mib_per_s ack_latency_us_p50 ack_latency_us_p99 ack_latency_us_p999 | tee -a "$dir/t3"
done
echo "median p99 $(awk '{print $3}' "$dir/t3" | median) us"

echo "# 4. recovery after kill -9 (ingest --crash leaves the open segment unsealed)"
for size in 1GiB 16GiB; do
  rm -rf "$dir/c"
  "$bin" bench ingest --dir "$dir/c" --bytes $size --record-size 64KiB --streams 225 --crash --json >/dev/null
  sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
  echo "$size: $("$bin" bench recover --dir "$dir/c" --json | j open_seconds records index_bytes index_bytes_per_record segments segments_scanned metadata_bytes_read scanned_bytes_read)"
done
echo "(columns: open_seconds records index_bytes bytes/record segments scanned metadata_read scan_read)"

echo "# 5. write amplification with a drain that keeps up (device bytes / stored bytes)"
rm -rf "$dir/c"
"$bin" bench ingest --dir "$dir/c" --bytes 8GiB --record-size 64KiB --streams 225 --drain --json | j mib_per_s write_amplification batches records
rm -rf "$dir/c"

peer=$here/benches/peer-raft-engine/target/release/peer-raft-engine
if [ -x "$peer" ]; then
  # One line per run: churnlog MiB/s, p50, p99 | raft-engine (best of 8 and 32 threads) MiB/s, p99 | ratios.
  peer_line='import json,sys; d=json.load(sys.stdin); c=d["churnlog"]; b=d["raft_engine"]["best"]; print(round(c["mib_per_s"]), c["ack_latency_us_p50"], c["ack_latency_us_p99"], round(b["mib_per_s"]), b["ack_latency_us_p99"], round(d["ratio_throughput"],3), round(d["ratio_p99"],3))'
  peer_mode() { # name, extra peer flags...
    local name=$1; shift
    echo "# 6 $name, $runs runs: churnlog MiB/s p50 p99 | raft-engine MiB/s p99 | ratio throughput, ratio p99"
    : > "$dir/t6"
    for i in $(seq "$runs"); do
      rm -rf "$dir/peer"
      "$peer" --dir "$dir/peer" --bytes 2GiB --record-size 64KiB --streams 225 --threads 8,32 "$@" --json \
        | python3 -c "$peer_line" | tee -a "$dir/t6"
    done
    rm -rf "$dir/peer"
    echo "median ratios: throughput $(awk '{print $6}' "$dir/t6" | median), p99 $(awk '{print $7}' "$dir/t6" | median)"
  }
  peer_mode "default depth (churnlog's 450 records in flight)"
  peer_mode "equal depth (32 producers x 1 record in flight), fresh files" --churnlog-producers 32 --churnlog-inflight 1
  peer_mode "equal depth, steady state (churnlog draining, raft-engine's files prefilled)" \
    --churnlog-producers 32 --churnlog-inflight 1 --churnlog-drain --raft-prefill
  if command -v fio >/dev/null; then
    # The device's own limit for the equal-depth pattern: one 1 MiB write then fdatasync,
    # serially, into a fresh file and over written blocks.
    echo "# 6 device ceiling at equal depth: fio 1 MiB O_DIRECT write + fdatasync each, MiB/s (fresh, overwrite)"
    for i in $(seq "$runs"); do
      rm -f "$dir/fio.bin"
      line=""
      for pass in fresh overwrite; do
        v=$(fio --name=serial --filename="$dir/fio.bin" --size=2G --bs=1M --rw=write --direct=1 --ioengine=psync \
              --fdatasync=1 --output-format=json 2>/dev/null \
            | python3 -c 'import json,sys; print(int(json.load(sys.stdin)["jobs"][0]["write"]["bw"]/1024))')
        line="$line $v"
      done
      echo "$line"
    done
    rm -f "$dir/fio.bin"
  fi
fi
