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
  echo "# 6. versus raft-engine (best of 8 and 32 threads, every write synced)"
  "$peer" --dir "$dir/peer" --bytes 2GiB --record-size 64KiB --streams 225 --threads 8,32 --json \
    | python3 -c 'import json,sys; d=json.load(sys.stdin); c=d["churnlog"]; b=d["raft_engine"]["best"]; print("churnlog", round(c["mib_per_s"]), "MiB/s p99", c["ack_latency_us_p99"], "| raft-engine best", round(b["mib_per_s"]), "MiB/s p99", b["ack_latency_us_p99"], "| ratios throughput", round(d["ratio_throughput"],2), "p99", round(d["ratio_p99"],2))'
  echo "# 6b. same queue depth: churnlog with 32 blocking producers (1 record in flight each)"
  "$peer" --dir "$dir/peer" --bytes 2GiB --record-size 64KiB --streams 225 --threads 32 --churnlog-producers 32 --churnlog-inflight 1 --json \
    | python3 -c 'import json,sys; d=json.load(sys.stdin); c=d["churnlog"]; b=d["raft_engine"]["best"]; print("churnlog", round(c["mib_per_s"]), "MiB/s p99", c["ack_latency_us_p99"], "| raft-engine 32", round(b["mib_per_s"]), "MiB/s p99", b["ack_latency_us_p99"], "| ratios throughput", round(d["ratio_throughput"],2), "p99", round(d["ratio_p99"],2))'
  rm -rf "$dir/peer"
fi
