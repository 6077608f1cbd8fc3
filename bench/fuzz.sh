#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 600) with scripts/fuzz.sh, one after the
# other, and writes bench/results/fuzz.md: executions, execs/s, coverage and corpus size.
# A crash fails the script (the input is kept under fuzz/artifacts/).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SECONDS_EACH=${1:-600}
WORK=$(mktemp -d /tmp/flux-fuzz.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
rows=()
for target in $(ls "$ROOT/fuzz/fuzz_targets" | sed 's/\.rs$//'); do
  echo "==> $target for ${SECONDS_EACH}s" >&2
  if ! "$ROOT/scripts/fuzz.sh" "$target" "$SECONDS_EACH" >"$WORK/$target.log" 2>&1; then
    tail -40 "$WORK/$target.log" >&2
    echo "==> $target crashed" >&2
    exit 1
  fi
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$WORK/$target.log")
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$WORK/$target.log")
  done_line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$WORK/$target.log" | tail -1)
  cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$done_line")
  feat=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$done_line")
  corp=$(sed -n 's/.* corp: \([0-9]*\/[0-9]*[a-zA-Z]*\).*/\1/p' <<<"$done_line")
  rows+=("| \`$target\` | $SECONDS_EACH | $runs | $rate | $cov | $feat | $corp | none |")
  echo "==> $target: $runs runs, $rate/s, cov $cov" >&2
done
{
  echo "# Fuzzing"
  echo
  echo "Measured by \`bench/fuzz.sh $SECONDS_EACH\` on $(date -u +%Y-%m-%d): $(nproc) CPUs (one fuzzer at a time, sharing"
  echo "the machine with other work), cargo-fuzz (libFuzzer, AddressSanitizer, $(rustc +nightly --version | cut -d' ' -f1-2)),"
  echo "starting from the seeds in \`fuzz/corpus/*/seed-*\`. Each target and what it checks: \`src/fuzz.rs\`."
  echo
  echo "| target | seconds | executions | execs/s | coverage (edges) | features | corpus (inputs/size) | crashes |"
  echo "|---|---|---|---|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
} >"$ROOT/bench/results/fuzz.md"
cat "$ROOT/bench/results/fuzz.md"
