#!/usr/bin/env bash
# One request must not stall a core: PING latency on another connection while four clients
# each send MGETs of 5.5 million one-byte keys (16 MiB frames), against one shard
# core: with the default limits.batch_keys_max (refused from a scan of the frame), with the
# limit raised so the batches are applied (in slices), and without the big requests. Also
# the server's peak RSS. Writes bench/results/big-requests.md.
source "$(dirname "$0")/lib.sh"
KEYS=${KEYS:-5500000}
HOGS=${HOGS:-4}
ROUNDS=${ROUNDS:-3}
build
rows=()
run() {  # run LABEL HOGS ARGS...
  local label=$1 hogs=$2; shift 2
  start_flux "$label" --cores 1 --cpus "$SERVER_CPU" --persistence-enabled false "$@"
  local c0 t0 c1 t1
  c0=$(cpu_seconds "$FLUX_PID")
  taskset -c "$CLIENT_CPU" python3 "$ROOT/bench/big_requests.py" "$FLUX_PORT" "$hogs" "$KEYS" "$ROUNDS" >"$WORK/$label.json"
  c1=$(cpu_seconds "$FLUX_PID")
  local hwm; hwm=$(awk '/VmHWM/ {print int($2/1024)}' "/proc/$FLUX_PID/status")
  stop_pid "$FLUX_PID"
  local j="$WORK/$label.json"
  rows+=("| $label | $(json_field "$j" pings) | $(json_field "$j" p50_ms) | $(json_field "$j" p99_ms) | $(json_field "$j" max_ms) | $(json_field "$j" replies) | $(json_field "$j" seconds) | $(printf '%.1f' "$(echo "$c1 - $c0" | bc -l)") | $hwm |")
  log "$label: $(cat "$j")"
}
run "no big requests" 0
run "default limit ($KEYS keys refused)" "$HOGS"
run "limit raised to 6000000 (applied in slices)" "$HOGS" --limits-batch-keys-max 6000000
{
  echo "# One request must not stall a core"
  echo
  echo "Measured by \`bench/big-requests.sh\` on $(date -u +%Y-%m-%d): $NPROC CPUs, Linux $(uname -r), release build."
  echo "One shard core on CPU $SERVER_CPU (persistence off); the clients (bench/big_requests.py) on CPU $CLIENT_CPU."
  echo "$HOGS connections each send $ROUNDS MGETs of $KEYS keys ($(python3 -c "import sys; sys.path.insert(0,'$ROOT/bench'); exec(open('$ROOT/bench/big_requests.py').read().split('def main')[0]); print(len(mget_frame(77,$KEYS)))") bytes a frame) while"
  echo "one more connection sends a PING every millisecond and times its reply."
  echo
  echo "| case | pings | PING p50 ms | PING p99 ms | PING max ms | big replies | seconds | server CPU s | peak RSS MiB |"
  echo "|---|---|---|---|---|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
  echo
  echo "Target: PING p99 under 10 ms while the four big requests run."
} >"$RESULTS/big-requests.md"
cat "$RESULTS/big-requests.md"
