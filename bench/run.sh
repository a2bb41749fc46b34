#!/usr/bin/env bash
# nix-daemon vs Stockade on the same workloads, side by side in one run (same harness setup,
# alternating timed runs). Prints median/min times and the ratio nix-daemon/Stockade: >= 1.0
# means Stockade is at least as fast. While Stockade cannot serve clients it prints
# nix-daemon's numbers, says why Stockade is unavailable and exits 0 (1 with --strict).
# Needs root (private mount namespaces). Options: see `bench/run.sh --help`; e.g.
#   bench/run.sh --runs 10 --workload add-tree
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d "$HOME/.cargo/bin" ]; then export PATH="$HOME/.cargo/bin:$PATH"; fi
# Every program the master execs must be a release build too: `stockade` runs the broker and
# the store-writer, the builder-helper and the roots-reader found next to itself, in
# target/release/.
cargo build --release -p stockade-master -p stockade-broker -p stockade-store-writer \
  -p stockade-builder-helper -p stockade-roots-reader -p stockade-tests --bin stockade \
  --bin stockade-broker --bin stockade-roots-reader \
  --bin stockade-store-writer --bin stockade-builder-helper --bin stockade-bench >&2
export STOCKADE_BIN="$PWD/target/release/stockade"
exec target/release/stockade-bench "$@"
