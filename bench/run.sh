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
cargo build --release -p stockade-master -p stockade-tests --bin stockade --bin stockade-bench >&2
exec target/release/stockade-bench "$@"
