#!/usr/bin/env bash
# A short run of every cargo-fuzz target from its committed seeds (fuzz/seeds/<target>),
# as CI does: FUZZ_SECONDS each (default 20). New inputs go to a temporary corpus; a
# crash leaves its input in fuzz/artifacts/<target>/ and fails the script.
# Needs cargo-fuzz; builds on stable with RUSTC_BOOTSTRAP=1.
set -euo pipefail
cd "$(dirname "$0")"
export RUSTC_BOOTSTRAP=1
seconds="${FUZZ_SECONDS:-20}"
targets=(wire_frames objects config_files recovery engine_ops nbd_parsers agent_files)
cargo fuzz build --sanitizer none
for t in "${targets[@]}"; do
  corpus="$(mktemp -d)"
  log="$(mktemp)"
  echo "fuzz smoke: $t for ${seconds}s"
  status=0
  cargo fuzz run --sanitizer none "$t" "$corpus" "seeds/$t" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1 || status=$?
  grep -E "^stat::(number_of_executed_units|peak_rss_mb)|panicked|SUMMARY" "$log" || true
  rm -rf "$corpus"
  if [ "$status" -ne 0 ]; then
    tail -40 "$log"
    echo "fuzz smoke: $t FAILED (input in fuzz/artifacts/$t/)"
    rm -f "$log"
    exit 1
  fi
  rm -f "$log"
done
echo "fuzz smoke: all targets ran clean"
