#!/usr/bin/env bash
# Memory per key: Flux-KV (1 shard core, persistence off) beside Redis 7 (no persistence),
# written by the same client (flux-bench; RESP mode against Redis) with distinct keys
# `user_<conn>_<i>` (about 16 B). Three workloads: 1,000,000 keys with 16 B values,
# 1,000,000 with 64 B, 300,000 with 1 KiB. For each server: RSS before and after the
# writes, RSS per key, server CPU per SET; for Flux-KV also Stats' memory_bytes beside the
# RSS growth. RSS after is read 2 s after the writes, once both allocators (jemalloc in
# both) have returned the pages freed during them. Writes bench/results/memory.md and
# bench/results/memory.json.
source "$(dirname "$0")/lib.sh"
C=${C:-100}
WORKLOADS=${WORKLOADS:-"16:1000000 64:1000000 1024:300000"}
need redis-server redis-server
need bc bc
build
ROWS="$WORK/rows.tsv"
: >"$ROWS"

rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }

# run SERVER PID PORT VALUE_BYTES KEYS ARGS...: writes KEYS keys, records one row.
run() {
  local server=$1 pid=$2 port=$3 value=$4 keys=$5; shift 5
  local before after accounted=""
  before=$(rss_kib "$pid")
  measure "$pid" "$WORK/run.json" "$BIN/flux-bench" --addr "127.0.0.1:$port" -c "$C" -n "$keys" \
    --value-bytes "$value" --json "$@"
  # Both servers use jemalloc, which returns pages freed during the run (old hash tables,
  # request buffers) within about a second.
  sleep 2
  after=$(rss_kib "$pid")
  if [ "$server" = Flux-KV ]; then
    accounted=$(flux_stat "$port" cores.0.memory_bytes)
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$server" "$value" "$keys" "$before" "$after" \
    "$(json_field "$WORK/run.json" qps | cut -d. -f1)" "$SERVER_CPU_PCT" "$accounted" >>"$ROWS"
  log "$(tail -1 "$ROWS")"
}

for w in $WORKLOADS; do
  value=${w%%:*}; keys=${w##*:}
  log "Redis: $keys keys, $value B values"
  start_redis
  run Redis "$REDIS_PID" "$REDIS_PORT" "$value" "$keys" --protocol resp
  stop_pid "$REDIS_PID"
  log "Flux-KV: $keys keys, $value B values"
  METRICS_LISTEN= start_flux memory --cores 1 --cpus "$SERVER_CPU" --persistence-enabled false
  run Flux-KV "$FLUX_PID" "$FLUX_PORT" "$value" "$keys"
  stop_pid "$FLUX_PID"
done

python3 - "$ROWS" "$RESULTS" "$C" "$NPROC" "$SERVER_CPU" "$CLIENT_CPU" \
  "$(redis-server --version | grep -o 'v=[0-9.]*' | cut -d= -f2)" "$(uname -r)" <<'PY'
import json, sys, datetime
rows_file, results, c, nproc, server_cpu, client_cpu, redis_version, kernel = sys.argv[1:]
keys = ["server", "value", "keys", "rss_before_kib", "rss_after_kib", "rps", "server_cpu", "memory_bytes"]
rows = []
for line in open(rows_file):
    if line.strip():
        r = dict(zip(keys, line.rstrip("\n").split("\t")))
        for k in ("value", "keys", "rss_before_kib", "rss_after_kib", "rps"):
            r[k] = int(r[k])
        r["server_cpu"] = float(r["server_cpu"])
        r["memory_bytes"] = int(r["memory_bytes"]) if r["memory_bytes"] else None
        rows.append(r)
mb = lambda kib: kib / 1024
md = ["# Memory per key: Flux-KV beside Redis", "",
      f"Measured by `bench/memory.sh` on {datetime.date.today()}: {nproc} CPUs, Linux {kernel}, Redis {redis_version}. "
      f"Both servers on CPU {server_cpu} without persistence, Flux-KV with 1 shard core and the metrics endpoint off; "
      f"the same client (flux-bench, RESP mode for Redis) on CPU {client_cpu} writes distinct keys `user_<conn>_<i>` "
      f"with {c} connections. RSS is the server's resident set before and after the writes; `growth / key` is the "
      "RSS growth per key written (RSS read 2 s after the writes, once the allocators returned freed pages); "
      "`us/SET` is server CPU per request.", "",
      "| values | keys | Flux-KV RSS after | Redis RSS after | ratio | Flux-KV growth / key | Redis growth / key | Flux-KV memory_bytes / RSS growth | us/SET Flux-KV | us/SET Redis |",
      "|---|---|---|---|---|---|---|---|---|---|"]
out = []
for value in sorted({r["value"] for r in rows}):
    f = next(r for r in rows if r["server"] == "Flux-KV" and r["value"] == value)
    red = next(r for r in rows if r["server"] == "Redis" and r["value"] == value)
    grow = lambda r: (r["rss_after_kib"] - r["rss_before_kib"]) * 1024
    us = lambda r: 10000 * r["server_cpu"] / r["rps"]
    acc = f["memory_bytes"] / grow(f) if f["memory_bytes"] and grow(f) > 0 else float("nan")
    md.append(f"| {value} B | {f['keys']:,} | {mb(f['rss_after_kib']):.0f} MB | {mb(red['rss_after_kib']):.0f} MB | "
              f"{f['rss_after_kib'] / red['rss_after_kib']:.2f}x | {grow(f) / f['keys']:.0f} B | {grow(red) / red['keys']:.0f} B | "
              f"{acc:.2f} | {us(f):.2f} | {us(red):.2f} |")
open(f"{results}/memory.md", "w").write("\n".join(md) + "\n")
json.dump(rows, open(f"{results}/memory.json", "w"), indent=1)
print("\n".join(md))
PY
