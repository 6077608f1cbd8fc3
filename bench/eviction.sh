#!/usr/bin/env bash
# Writes past a memory limit: Flux-KV with limits.eviction = lru beside Redis 7 with
# maxmemory-policy allkeys-lru, both limited to LIMIT_MB, and Flux-KV without a limit for
# reference. One server at a time on SERVER_CPU, persistence off (Flux-KV: 1 shard core,
# metrics off); the same client (flux-bench, RESP mode against Redis) on CLIENT_CPU sends
# N SETs of distinct keys `user_<conn>_<i>` with 64 B values, C connections, pipeline 16:
# about four times what the limit holds, so most writes evict. REPEAT alternating rounds;
# medians of throughput and server CPU per SET; keys held, memory and evictions after the
# last round. Writes bench/results/eviction.md.
source "$(dirname "$0")/lib.sh"
C=${C:-100}
N=${N:-3000000}
LIMIT_MB=${LIMIT_MB:-64}
REPEAT=${REPEAT:-3}
need redis-server redis-server
need redis-cli redis-tools
need bc bc
build
ROWS="$WORK/rows.tsv"
: >"$ROWS"
limit=$((LIMIT_MB << 20))

# row NAME PID: records throughput and CPU of the last run with the server's figures.
row() {
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$(json_field "$WORK/run.json" qps | cut -d. -f1)" "$SERVER_CPU_PCT" \
    "$2" "$3" "$4" >>"$ROWS"
  log "$(tail -1 "$ROWS")"
}

flux() {  # flux NAME ARGS...
  local name=$1; shift
  METRICS_LISTEN= start_flux "$name" --cores 1 --cpus "$SERVER_CPU" --persistence-enabled false "$@"
  measure "$FLUX_PID" "$WORK/run.json" "$BIN/flux-bench" --addr "127.0.0.1:$FLUX_PORT" -c "$C" -P 16 -n "$N" \
    --value-bytes 64 --json
  row "$name" "$(flux_stat "$FLUX_PORT" cores.0.keys)" "$(flux_stat "$FLUX_PORT" cores.0.memory_bytes)" \
    "$(flux_stat "$FLUX_PORT" cores.0.keys_evicted)"
  stop_pid "$FLUX_PID"
}

redis() {
  start_redis --maxmemory "$limit" --maxmemory-policy allkeys-lru
  measure "$REDIS_PID" "$WORK/run.json" "$BIN/flux-bench" --addr "127.0.0.1:$REDIS_PORT" -c "$C" -P 16 -n "$N" \
    --value-bytes 64 --json --protocol resp
  local info; info=$(redis-cli -p "$REDIS_PORT" info)
  field() { printf '%s\n' "$info" | tr -d '\r' | awk -F: -v k="$1" '$1 == k { print $2 }'; }
  row "Redis, allkeys-lru" "$(redis-cli -p "$REDIS_PORT" dbsize)" "$(field used_memory)" "$(field evicted_keys)"
  stop_pid "$REDIS_PID"
}

for rep in $(seq 1 "$REPEAT"); do
  log "round $rep of $REPEAT"
  flux "Flux-KV, lru" --limits-memory-bytes-max "$limit" --limits-eviction lru
  redis
  flux "Flux-KV, no limit"
done

python3 - "$ROWS" "$RESULTS" "$N" "$C" "$REPEAT" "$LIMIT_MB" "$SERVER_CPU" "$CLIENT_CPU" \
  "$(redis-server --version | grep -o 'v=[0-9.]*' | cut -d= -f2)" <<'PY'
import sys, statistics, datetime
rows_file, results, n, c, repeat, limit_mb, server_cpu, client_cpu, redis_version = sys.argv[1:]
rows = [l.rstrip("\n").split("\t") for l in open(rows_file) if l.strip()]
names = list(dict.fromkeys(r[0] for r in rows))
med = {}
for name in names:
    rs = [r for r in rows if r[0] == name]
    med[name] = (statistics.median(int(r[1]) for r in rs),
                 statistics.median(10000 * float(r[2]) / int(r[1]) for r in rs), rs[-1])
ref = med["Redis, allkeys-lru"][0]
md = ["# Eviction: writes past the memory limit", "",
      f"Measured by `bench/eviction.sh` on {datetime.date.today()}: one server at a time on CPU {server_cpu} "
      f"without persistence (Flux-KV: 1 shard core, metrics off; Redis {redis_version}); the same client "
      f"(flux-bench, RESP mode for Redis) on CPU {client_cpu} sends {int(n):,} SETs of distinct keys with 64 B "
      f"values, {c} connections, pipeline 16. Limits: {limit_mb} MiB (`limits.memory_bytes_max`, "
      f"`limits.eviction = lru`; Redis `maxmemory`, `allkeys-lru`). {repeat} alternating rounds, medians; "
      "keys, memory and evictions are from the last round (memory: Flux-KV's `memory_bytes`, Redis' `used_memory`).", "",
      "| server | SET/s | vs Redis | us CPU / SET | keys held | memory | evicted |",
      "|---|---|---|---|---|---|---|"]
for name in names:
    qps, us, last = med[name]
    md.append(f"| {name} | {qps:,.0f} | {qps / ref:.2f}x | {us:.2f} | {int(last[3]):,} | "
              f"{int(last[4]) / 2**20:.1f} MiB | {int(last[5]):,} |")
md += ["", "Every run: " + ", ".join(f"{r[0]} {int(r[1]):,}" for r in rows) + "."]
open(f"{results}/eviction.md", "w").write("\n".join(md) + "\n")
print("\n".join(md))
PY
