#!/usr/bin/env bash
# Persistence cost, side by side in one run: flux-bench -c 100 -n 500000 SET against
# flux-server with 1 shard core (on SERVER_CPU) with the log off, fsync no / everysec /
# always; and Redis on the same CPU without persistence, appendfsync everysec and always,
# measured with the same client (flux-bench --protocol resp). Writes
# bench/results/durability.md.
source "$(dirname "$0")/lib.sh"
N=${N:-500000}
C=${C:-100}
need redis-server redis-server
need bc bc
build
declare -A QPS
rows=()
run_flux() {  # run_flux LABEL ARGS...
  local label=$1; shift
  start_flux "$label" --cores 1 --cpus "$SERVER_CPU" "$@"
  measure "$FLUX_PID" "$WORK/$label.json" "$BIN/flux-bench" --addr "127.0.0.1:$FLUX_PORT" -c "$C" -n "$N" --json
  stop_pid "$FLUX_PID"
  QPS[$label]=$(json_field "$WORK/$label.json" qps | cut -d. -f1)
  rows+=("| Flux-KV | $label | ${QPS[$label]} | $SERVER_CPU_PCT % | $(json_field "$WORK/$label.json" latency_us.p50) / $(json_field "$WORK/$label.json" latency_us.p99) |")
  log "flux $label: ${QPS[$label]}"
}
run_redis() {  # run_redis LABEL ARGS...
  local label=$1; shift
  start_redis "$@"
  measure "$REDIS_PID" "$WORK/redis-$label.json" "$BIN/flux-bench" --protocol resp --addr "127.0.0.1:$REDIS_PORT" -c "$C" -n "$N" --json
  stop_pid "$REDIS_PID"
  QPS[redis-$label]=$(json_field "$WORK/redis-$label.json" qps | cut -d. -f1)
  rows+=("| Redis | $label | ${QPS[redis-$label]} | $SERVER_CPU_PCT % | $(json_field "$WORK/redis-$label.json" latency_us.p50) / $(json_field "$WORK/redis-$label.json" latency_us.p99) |")
  log "redis $label: ${QPS[redis-$label]}"
}

run_flux off --persistence-enabled false
run_flux no --persistence-fsync no
run_flux everysec --persistence-fsync everysec
run_flux always --persistence-fsync always
run_redis off
run_redis everysec --appendonly yes --appendfsync everysec
run_redis always --appendonly yes --appendfsync always

{
  echo "# Persistence: throughput by fsync mode"
  echo
  echo "Measured by \`bench/durability.sh\` on $(date -u +%Y-%m-%d): $NPROC CPUs, Linux $(uname -r), data on"
  echo "$(df -T "$WORK" | awk 'NR==2 {print $2}'). One shard core and Redis each on CPU $SERVER_CPU, flux-bench \`-c $C -n $N\` SET"
  echo "(distinct keys) on CPU $CLIENT_CPU for both (RESP for Redis)."
  echo
  echo "| server | mode | requests/s | server CPU | p50 / p99 us |"
  echo "|---|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
  echo
  echo "- Flux-KV everysec / off = **$(ratio "${QPS[everysec]}" "${QPS[off]}")x** (target 0.95x); always / off = **$(ratio "${QPS[always]}" "${QPS[off]}")x** (target 0.8x)"
  echo "- Flux-KV / Redis: everysec **$(ratio "${QPS[everysec]}" "${QPS[redis-everysec]}")x**, always **$(ratio "${QPS[always]}" "${QPS[redis-always]}")x**"
  echo "- Redis everysec / off = $(ratio "${QPS[redis-everysec]}" "${QPS[redis-off]}")x, always / off = $(ratio "${QPS[redis-always]}" "${QPS[redis-off]}")x"
  echo
  echo "Not measured yet: recovery time for 1,000,000 keys next to Redis loading an AOF (snapshots are not implemented)."
} >"$RESULTS/durability.md"
cat "$RESULTS/durability.md"
