#!/usr/bin/env bash
# Persistence cost, side by side in one run: flux-bench -c 100 -n 500000 SET against
# flux-server with 1 shard core (on SERVER_CPU) with the log off, fsync no / everysec /
# always; and Redis on the same CPU without persistence, appendfsync everysec and always,
# measured with the same client (flux-bench --protocol resp). Then recovery time for
# 1,000,000 keys of 100-byte values next to Redis loading its AOF, and the peak memory of
# recovering a log that holds every key three times. Writes
# bench/results/durability.md.
source "$(dirname "$0")/lib.sh"
N=${N:-500000}
C=${C:-100}
need redis-server redis-server
need bc bc
need redis-cli redis-tools
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

# Recovery: the same 1,000,000 keys of 100-byte values in Flux-KV (1 shard core) and in
# Redis with an AOF, loaded by flux-bench; each restarted from its log of commands, then
# from a compacted form (Flux-KV snapshots, Redis BGREWRITEAOF with its RDB preamble).
# Time = launch until the server answers, measured the same way for both.
RK=${RECOVERY_KEYS:-1000000}
ping_redis() { [ "$(redis-cli -p "$1" ping 2>/dev/null)" = PONG ]; }
redis_restart() {  # redis_restart DIR [ARGS...]: sets REDIS_PID REDIS_PORT READY_S
  local dir=$1; shift
  REDIS_PORT=$(free_port)
  local t0; t0=$(date +%s.%N)
  taskset -c "$SERVER_CPU" redis-server --port "$REDIS_PORT" --dir "$dir" --save '' --appendonly yes \
    --appendfsync everysec --daemonize no --logfile "$dir.log" "$@" &
  REDIS_PID=$!
  PIDS+=("$REDIS_PID")
  until ping_redis "$REDIS_PORT"; do sleep 0.005; done
  READY_S=$(echo "$(date +%s.%N) - $t0" | bc -l)
}
log "recovery: loading $RK keys into Flux-KV"
start_flux recovery --cores 1 --cpus "$SERVER_CPU" --persistence-snapshot-log-bytes-min 1073741824
taskset -c "$CLIENT_CPU" "$BIN/flux-bench" --addr "127.0.0.1:$FLUX_PORT" -c "$C" -n "$RK" --value-bytes 100 --json >/dev/null
stop_pid "$FLUX_PID"
flux_log_bytes=$(du -sb "$WORK/recovery/wal" | cut -f1)
restart_flux recovery --cores 1 --cpus "$SERVER_CPU" --persistence-snapshot-log-bytes-min 1073741824
flux_log_s=$READY_S
recovery_ms() { flux_stat "$FLUX_PORT" persistence.recovery_ms; }
flux_log_ms=$(recovery_ms)
flux_log_keys=$(flux_stat "$FLUX_PORT" cores.0.keys)
"$BIN/flux-cli" --addr "127.0.0.1:$FLUX_PORT" --timeout 60s snapshot >&2
stop_pid "$FLUX_PID"
flux_snap_bytes=$(du -sb "$WORK/recovery/snapshots" | cut -f1)
restart_flux recovery --cores 1 --cpus "$SERVER_CPU"
flux_snap_s=$READY_S
flux_snap_ms=$(recovery_ms)
flux_snap_keys=$(flux_stat "$FLUX_PORT" cores.0.keys)
stop_pid "$FLUX_PID"

# Recovery memory: the same keys written three times (the log holds 3x the data), kill -9,
# restart; peak RSS while recovering (VmHWM once ready) against RSS once recovered.
log "recovery memory: $RK keys x 100 B, each written 3 times, kill -9"
start_flux recmem --cores 1 --cpus "$SERVER_CPU" --persistence-snapshot-log-bytes-min 1073741824
for _ in 1 2 3; do
  taskset -c "$CLIENT_CPU" "$BIN/flux-bench" --addr "127.0.0.1:$FLUX_PORT" -c "$C" -n "$RK" --value-bytes 100 --json >/dev/null
done
kill -9 "$FLUX_PID"; wait "$FLUX_PID" 2>/dev/null || true
recmem_log_bytes=$(du -sb "$WORK/recmem/wal" | cut -f1)
restart_flux recmem --cores 1 --cpus "$SERVER_CPU" --persistence-snapshot-log-bytes-min 1073741824
recmem_s=$READY_S
recmem_peak=$(awk '/VmHWM/ {print $2}' "/proc/$FLUX_PID/status")
sleep 1
recmem_steady=$(awk '/VmRSS/ {print $2}' "/proc/$FLUX_PID/status")
recmem_keys=$(flux_stat "$FLUX_PORT" cores.0.keys)
stop_pid "$FLUX_PID"

log "recovery: loading $RK keys into Redis (appendonly)"
# No automatic rewrite while loading: the first restart replays commands only.
start_redis --appendonly yes --appendfsync everysec --auto-aof-rewrite-percentage 0
rdir="$WORK/redis-$REDIS_PORT"
taskset -c "$CLIENT_CPU" "$BIN/flux-bench" --protocol resp --addr "127.0.0.1:$REDIS_PORT" -c "$C" -n "$RK" --value-bytes 100 --json >/dev/null
stop_pid "$REDIS_PID"
redis_aof_bytes=$(du -sb "$rdir" | cut -f1)
redis_restart "$rdir" --auto-aof-rewrite-percentage 0
redis_aof_s=$READY_S
redis_aof_keys=$(redis-cli -p "$REDIS_PORT" dbsize)
redis-cli -p "$REDIS_PORT" bgrewriteaof >/dev/null
until [ "$(redis-cli -p "$REDIS_PORT" info persistence | awk -F: '/aof_rewrite_in_progress/ {print $2+0}')" = 0 ] &&
  [ "$(redis-cli -p "$REDIS_PORT" info persistence | awk -F: '/aof_rewrite_scheduled/ {print $2+0}')" = 0 ]; do sleep 0.1; done
stop_pid "$REDIS_PID"
redis_rdb_bytes=$(du -sb "$rdir" | cut -f1)
redis_restart "$rdir"
redis_rdb_s=$READY_S
redis_rdb_keys=$(redis-cli -p "$REDIS_PORT" dbsize)
stop_pid "$REDIS_PID"
secs() { printf '%.2f' "$1"; }

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
  echo "## Recovery of $RK keys (100-byte values)"
  echo
  echo "Loaded with flux-bench \`-c $C -n $RK --value-bytes 100\` (distinct keys), stopped, restarted; time from"
  echo "launch until the server answers (Flux-KV opens its port only after recovery; Redis answers PING"
  echo "once loading is done). One shard core; Redis on the same CPU."
  echo
  echo "| server | recovered from | bytes on disk | keys after restart | time to ready (s) | recovery in Stats (ms) |"
  echo "|---|---|---|---|---|---|"
  echo "| Flux-KV | write-ahead log | $flux_log_bytes | $flux_log_keys | $(secs "$flux_log_s") | $flux_log_ms |"
  echo "| Redis 7 | AOF (commands) | $redis_aof_bytes | $redis_aof_keys | $(secs "$redis_aof_s") | |"
  echo "| Flux-KV | snapshots | $flux_snap_bytes | $flux_snap_keys | $(secs "$flux_snap_s") | $flux_snap_ms |"
  echo "| Redis 7 | AOF after BGREWRITEAOF (RDB preamble) | $redis_rdb_bytes | $redis_rdb_keys | $(secs "$redis_rdb_s") | |"
  echo
  echo "- Flux-KV / Redis recovery time: from the log **$(ratio "$flux_log_s" "$redis_aof_s")x**, from snapshots **$(ratio "$flux_snap_s" "$redis_rdb_s")x** (lower is faster)"
  echo
  echo "## Recovery memory"
  echo
  echo "$RK keys of 100-byte values, each written 3 times (flux-bench \`-c $C -n $RK --value-bytes 100\` three"
  echo "times), then kill -9 and a restart; the log is replayed (no snapshot). Peak RSS is VmHWM once the"
  echo "node answers (recovery runs before the port opens), steady RSS is VmRSS a second later."
  echo
  echo "| log bytes | keys after restart | time to ready (s) | peak RSS (MiB) | steady RSS (MiB) | peak / steady |"
  echo "|---|---|---|---|---|---|"
  echo "| $recmem_log_bytes | $recmem_keys | $(secs "$recmem_s") | $((recmem_peak / 1024)) | $((recmem_steady / 1024)) | **$(ratio "$recmem_peak" "$recmem_steady")x** |"
  echo
  echo "Target: peak at most 1.3x steady."
} >"$RESULTS/durability.md"
cat "$RESULTS/durability.md"
