#!/usr/bin/env bash
# Short fuzz smoke run of every target: catches crashes on the easy paths, not a campaign.
# Usage: fuzz/smoke.sh [seconds-per-target]   (needs cargo-fuzz; runs on stable via RUSTC_BOOTSTRAP)
set -euo pipefail
secs=${1:-20}
cd "$(dirname "$0")"
export RUSTC_BOOTSTRAP=1
targets=$(cargo fuzz list)
cargo fuzz build -O $targets >/dev/null 2>&1 || cargo fuzz build -O
for t in $targets; do
  mkdir -p "corpus/$t"
  [ -d "seeds/$t" ] && cp -n seeds/$t/* "corpus/$t/" 2>/dev/null || true
  echo "fuzz smoke: $t for ${secs}s"
  cargo fuzz run -O "$t" "corpus/$t" -- -max_total_time="$secs" -rss_limit_mb=2048 -max_len=1048576 2>&1 | tail -n 3
done
echo "fuzz smoke: all targets ran without a crash"
