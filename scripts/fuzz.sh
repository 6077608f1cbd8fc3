#!/usr/bin/env bash
# Runs one coverage-guided fuzz target for SECONDS (cargo-fuzz, libFuzzer, a nightly
# toolchain), starting from the committed seeds plus whatever earlier local runs found, and
# prints libFuzzer's closing statistics (executions, execs/s, coverage).
#
#   scripts/fuzz.sh TARGET SECONDS        targets: fuzz/fuzz_targets/*.rs
#
# A crash stops the run with a non-zero status and leaves the input under
# fuzz/artifacts/TARGET/ (replay it: cargo +nightly fuzz run TARGET fuzz/artifacts/TARGET/<file>).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

usage() {
  echo "usage: scripts/fuzz.sh TARGET SECONDS; targets: $(ls fuzz_targets | sed 's/\.rs$//' | tr '\n' ' ')" >&2
  exit 2
}
target=${1:-}
seconds=${2:-}
[ -n "$target" ] && [ -f "fuzz_targets/$target.rs" ] || usage
[[ "$seconds" =~ ^[0-9]+$ ]] || usage

if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  echo "scripts/fuzz.sh: libFuzzer needs a nightly toolchain: rustup toolchain install nightly" >&2
  exit 2
fi
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked

mkdir -p "corpus/$target"
# -O: optimised with debug assertions (cargo-fuzz's default build is also release).
exec cargo +nightly fuzz run -O "$target" "corpus/$target" -- \
  -max_total_time="$seconds" -print_final_stats=1 -max_len=65536 -timeout=10 -rss_limit_mb=2048
