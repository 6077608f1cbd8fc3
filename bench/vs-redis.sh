#!/usr/bin/env bash
# Flux-KV versus Redis 7, side by side in one run: SET, C=100 connections, N=500,000
# requests (4 * N when pipelined with 16 per connection). Writes bench/results/vs-redis.md
# and bench/results/vs-redis.json.
#
# Two workloads, because redis-benchmark's default is not the old service's:
#   one-key   redis-benchmark -t set writes the same key ("key:__rand_int__") every time;
#             flux-bench --keys 1 does the same.
#   distinct  the old service's workload: every SET a new key user_<conn>_<i>, value
#             value_<i % 1000> (flux-bench's default); redis-benchmark -r 1000000000 comes
#             closest (random keys from a space of 10^9).
# Servers: Redis (no persistence) and flux-server with 1 shard core, both pinned to
# SERVER_CPU; flux-server with one shard core per CPU. Clients are pinned to CLIENT_CPU.
# On a 2-CPU machine the all-cores server shares CPU 0 with the client. Like Redis here,
# Flux-KV runs without persistence (bench/durability.sh compares the log modes).
#
# Then the cost of metrics: the 1-core node, distinct keys, with the metrics endpoint on
# (per-request figures kept, /metrics scraped every second from the client CPU, more often
# than Prometheus' usual 15 s) and off (figures not kept), alternating REPEAT times each;
# medians go to the "Metrics on and off" section.
#
# Last, Redis' own benchmark against both servers over RESP (Flux-KV's `resp.listen`):
# Redis and a 1-core Flux-KV each on SERVER_CPU, redis-benchmark on CLIENT_CPU, no
# persistence; `-t set` then `-t get`, -c 100 -n 500000, -r 1000000 (distinct keys), with
# and without -P 16; RESP_REPEAT (default 5: single runs swing by a quarter here)
# alternating rounds, medians, server CPU per request.
source "$(dirname "$0")/lib.sh"
N=${N:-500000}
C=${C:-100}
need redis-server redis-server
need redis-benchmark redis-tools
need bc bc
build
ROWS="$WORK/rows.tsv"
: >"$ROWS"

# row SERVER CLIENT WORKLOAD PIPELINE RPS SERVER_CPU CLIENT_CPU P50 P99 P999
row() { printf '%s\t' "$@" | sed 's/\t$//' >>"$ROWS"; echo >>"$ROWS"; }

flux_bench() {  # flux_bench SERVER_LABEL PID PORT WORKLOAD PIPELINE ARGS...
  local server=$1 pid=$2 port=$3 workload=$4 p=$5; shift 5
  local n=$N; [ "$p" -gt 1 ] && n=$((4 * N))
  local out="$WORK/run.json"
  measure "$pid" "$out" "$BIN/flux-bench" --addr "127.0.0.1:$port" -c "$C" -n "$n" -P "$p" --json "$@"
  row "$server" "flux-bench${*:+ $*}" "$workload" "$p" "$(json_field "$out" qps | cut -d. -f1)" "$SERVER_CPU_PCT" \
    "$(json_field "$out" client_cpu_percent)" "$(json_field "$out" latency_us.p50)" \
    "$(json_field "$out" latency_us.p99)" "$(json_field "$out" latency_us.p999)"
  log "$(tail -1 "$ROWS")"
}

redis_benchmark() {  # redis_benchmark WORKLOAD PIPELINE ARGS...
  local workload=$1 p=$2; shift 2
  local n=$N; [ "$p" -gt 1 ] && n=$((4 * N))
  measure "$REDIS_PID" "$WORK/rb.csv" redis-benchmark -p "$REDIS_PORT" -t set -c "$C" -n "$n" -P "$p" --csv "$@"
  row "Redis" "redis-benchmark${*:+ $*}" "$workload" "$p" "$(redis_rps "$WORK/rb.csv")" "$SERVER_CPU_PCT" "" "" "" ""
  log "$(tail -1 "$ROWS")"
}

log "Redis on CPU $SERVER_CPU"
start_redis
for p in 1 16; do
  redis_benchmark one-key "$p"
  flux_bench Redis "$REDIS_PID" "$REDIS_PORT" one-key "$p" --protocol resp --keys 1
  redis-cli -p "$REDIS_PORT" flushall >/dev/null
  redis_benchmark distinct "$p" -r 1000000000
  redis-cli -p "$REDIS_PORT" flushall >/dev/null
  flux_bench Redis "$REDIS_PID" "$REDIS_PORT" distinct "$p" --protocol resp
  redis-cli -p "$REDIS_PORT" flushall >/dev/null
done
stop_pid "$REDIS_PID"

for layout in one all; do
  if [ "$layout" = one ]; then
    label="Flux-KV 1 core"; args=(--cores 1 --cpus "$SERVER_CPU" --persistence-enabled false)
  else
    label="Flux-KV $NPROC cores"; args=(--cores "$NPROC" --cpus "$(seq -s, 0 $((NPROC - 1)))" --persistence-enabled false)
  fi
  for p in 1 16; do
    for workload in one-key distinct; do
      # A fresh server per run, so every distinct-keys run starts from an empty store.
      log "$label, $workload, pipeline $p"
      start_flux "$layout" "${args[@]}"
      if [ "$workload" = one-key ]; then
        flux_bench "$label" "$FLUX_PID" "$FLUX_PORT" "$workload" "$p" --keys 1
      else
        flux_bench "$label" "$FLUX_PID" "$FLUX_PORT" "$workload" "$p"
      fi
      stop_pid "$FLUX_PID"
    done
  done
done

REPEAT=${REPEAT:-3}
MROWS="$WORK/metrics.tsv"
: >"$MROWS"
need curl curl
for p in 1 16; do
  for rep in $(seq 1 "$REPEAT"); do
    for mode in on off; do
      scraper=
      if [ "$mode" = on ]; then
        mport=$(free_port)
        METRICS_LISTEN="127.0.0.1:$mport" start_flux "metrics-$mode" --cores 1 --cpus "$SERVER_CPU" --persistence-enabled false
        taskset -c "$CLIENT_CPU" bash -c "while sleep 1; do curl -sf -o /dev/null http://127.0.0.1:$mport/metrics || exit 1; done" &
        scraper=$!
      else
        METRICS_LISTEN= start_flux "metrics-$mode" --cores 1 --cpus "$SERVER_CPU" --persistence-enabled false
      fi
      n=$N; [ "$p" -gt 1 ] && n=$((4 * N))
      measure "$FLUX_PID" "$WORK/m.json" "$BIN/flux-bench" --addr "127.0.0.1:$FLUX_PORT" -c "$C" -n "$n" -P "$p" --json
      if [ -n "$scraper" ]; then
        kill -0 "$scraper" 2>/dev/null || { log "the /metrics scraper failed"; exit 1; }
        kill "$scraper"; wait "$scraper" 2>/dev/null || true
      fi
      printf '%s\t%s\t%s\t%s\t%s\n' "$mode" "$p" "$(json_field "$WORK/m.json" qps | cut -d. -f1)" "$SERVER_CPU_PCT" \
        "$(json_field "$WORK/m.json" latency_us.p99)" >>"$MROWS"
      log "metrics $mode, pipeline $p: $(tail -1 "$MROWS")"
      stop_pid "$FLUX_PID"
    done
  done
done

RROWS="$WORK/resp.tsv"
: >"$RROWS"
# resp_run SERVER PID PORT TEST PIPELINE: one redis-benchmark line, recorded.
resp_run() {
  measure "$2" "$WORK/rb.csv" redis-benchmark -p "$3" -t "$4" -c "$C" -n "$N" -r 1000000 -P "$5" --csv
  printf '%s	%s	%s	%s	%s
' "$1" "$4" "$5" "$(redis_rps "$WORK/rb.csv")" "$SERVER_CPU_PCT" >>"$RROWS"
  log "redis-benchmark: $(tail -1 "$RROWS")"
}
RESP_REPEAT=${RESP_REPEAT:-5}
for rep in $(seq 1 "$RESP_REPEAT"); do
  for p in 1 16; do
    start_redis
    resp_run Redis "$REDIS_PID" "$REDIS_PORT" set "$p"
    resp_run Redis "$REDIS_PID" "$REDIS_PORT" get "$p"
    stop_pid "$REDIS_PID"
    rport=$(free_port)
    METRICS_LISTEN= start_flux resp --cores 1 --cpus "$SERVER_CPU" --persistence-enabled false \
      --resp-listen "127.0.0.1:$rport"
    wait_port "$rport"
    resp_run Flux-KV "$FLUX_PID" "$rport" set "$p"
    resp_run Flux-KV "$FLUX_PID" "$rport" get "$p"
    stop_pid "$FLUX_PID"
  done
done

python3 - "$ROWS" "$RESULTS" "$N" "$C" "$NPROC" "$CLIENT_CPU" "$SERVER_CPU" \
  "$(redis-server --version | grep -o 'v=[0-9.]*' | cut -d= -f2)" "$(uname -r)" "$MROWS" "$REPEAT" "$RROWS" "$RESP_REPEAT" <<'PY'
import json, sys, datetime, statistics
rows_file, results, n, c, nproc, client_cpu, server_cpu, redis_version, kernel, metrics_file, repeat, resp_file, resp_repeat = sys.argv[1:]
keys = ["server", "client", "workload", "pipeline", "rps", "server_cpu", "client_cpu", "p50", "p99", "p999"]
rows = []
for line in open(rows_file):
    if line.strip():
        r = dict(zip(keys, line.rstrip("\n").split("\t")))
        r["pipeline"], r["rps"], r["server_cpu"] = int(r["pipeline"]), int(r["rps"]), float(r["server_cpu"])
        rows.append(r)

def find(server, client_prefix, workload, p):
    for r in rows:
        if r["server"] == server and r["client"].startswith(client_prefix) and r["workload"] == workload and r["pipeline"] == p:
            return r
    return None

md = [f"# Flux-KV vs Redis: SET, {c} connections", "",
      f"Measured by `bench/vs-redis.sh` on {datetime.date.today()}: {nproc} CPUs, Linux {kernel}, Redis {redis_version} "
      f"without persistence. Clients on CPU {client_cpu}; Redis and the 1-core Flux-KV on CPU {server_cpu}; the "
      f"{nproc}-core Flux-KV on CPUs 0-{int(nproc)-1}, sharing CPU {client_cpu} with the client. {n} requests "
      f"without pipelining, {4*int(n)} with 16 per connection. `server CPU` is the server process's user+system "
      f"time over the run (% of one core); `us/req` is server CPU per request.", "",
      "Workloads: **one-key** is redis-benchmark's default (`-t set` writes the same key every time); "
      "**distinct** is the old service's benchmark (a new key `user_<conn>_<i>` per SET, values "
      "`value_<i % 1000>`); redis-benchmark's nearest is `-r 1000000000`.", ""]

ref = {(w, p): find("Redis", "redis-benchmark", w, p) for w in ("one-key", "distinct") for p in (1, 16)}
head = find("Redis", "redis-benchmark", "one-key", 1)
flux_all = f"Flux-KV {nproc} cores"
lit = find(flux_all, "flux-bench", "distinct", 1)
lit16 = find(flux_all, "flux-bench", "distinct", 16)
head16 = find("Redis", "redis-benchmark", "one-key", 16)
md += ["## The comparison the issue names", "",
       f"flux-bench `-c {c} -n {n}` (distinct keys) against flux-server with {nproc} shard cores, versus "
       f"`redis-benchmark -t set -c {c} -n {n}` against Redis (one key):", "",
       f"- no pipelining: {lit['rps']:,} vs {head['rps']:,} requests/s = **{lit['rps']/head['rps']:.2f}x**",
       f"- pipeline 16: {lit16['rps']:,} vs {head16['rps']:,} requests/s = **{lit16['rps']/head16['rps']:.2f}x**", "",
       "## All runs", "",
       "| server | client | workload | pipeline | requests/s | vs Redis, same workload and pipeline | server CPU | us/req | client CPU | p50 / p99 / p99.9 us |",
       "|---|---|---|---|---|---|---|---|---|---|"]
for r in rows:
    base = ref[(r["workload"], r["pipeline"])]
    vs = f"{r['rps']/base['rps']:.2f}x" if base else ""
    same = find("Redis", "flux-bench", r["workload"], r["pipeline"])
    if r["server"].startswith("Flux") and same:
        vs += f" ({r['rps']/same['rps']:.2f}x vs Redis with flux-bench)"
    us = 10000 * r["server_cpu"] / r["rps"] if r["rps"] else 0
    lat = f"{r['p50']} / {r['p99']} / {r['p999']}" if r["p50"] else ""
    cc = f"{r['client_cpu']} %" if r["client_cpu"] else ""
    md.append(f"| {r['server']} | {r['client']} | {r['workload']} | {r['pipeline']} | {r['rps']:,} | {vs} | "
              f"{r['server_cpu']:.0f} % | {us:.2f} | {cc} | {lat} |")

mrows = []
for line in open(metrics_file):
    if line.strip():
        mode, p, rps, cpu, p99 = line.split("\t")
        mrows.append({"metrics": mode, "pipeline": int(p), "rps": int(rps), "server_cpu": float(cpu), "p99": int(p99)})
md += ["", "## Metrics on and off", "",
       f"Flux-KV 1 core on CPU {server_cpu}, distinct keys, {c} connections, {repeat} alternating runs per mode; medians. "
       "**on**: per-request figures kept (requests by op, latency histograms, errors, hits) and /metrics scraped every "
       "second from the client CPU; **off**: `metrics.listen = \"\"`, no figures kept.", "",
       "| pipeline | requests/s on | requests/s off | on / off | us/req on | us/req off | p99 us on / off |",
       "|---|---|---|---|---|---|---|"]
for p in (1, 16):
    med = {}
    for mode in ("on", "off"):
        rs = [r for r in mrows if r["metrics"] == mode and r["pipeline"] == p]
        rps = statistics.median(r["rps"] for r in rs)
        med[mode] = (rps, statistics.median(10000 * r["server_cpu"] / r["rps"] for r in rs),
                     statistics.median(r["p99"] for r in rs))
    (on, on_us, on_p99), (off, off_us, off_p99) = med["on"], med["off"]
    md.append(f"| {p} | {on:,.0f} | {off:,.0f} | {on/off:.3f}x | {on_us:.2f} | {off_us:.2f} | {on_p99:.0f} / {off_p99:.0f} |")
md += ["", "Every run: " + ", ".join(f"{r['metrics']} P{r['pipeline']} {r['rps']:,}" for r in mrows) + "."]

rrows = []
for line in open(resp_file):
    if line.strip():
        server, test, p, rps, cpu = line.rstrip("\n").split("\t")
        rrows.append({"server": server, "test": test, "pipeline": int(p), "rps": int(rps), "server_cpu": float(cpu)})
md += ["", "## Redis' own benchmark, over RESP", "",
       f"`redis-benchmark -t set|get -c {c} -n {n} -r 1000000 [-P 16]` on CPU {client_cpu} against Redis and against "
       f"Flux-KV's Redis port (`resp.listen`, 1 shard core), each alone on CPU {server_cpu}, no persistence; SET runs "
       f"first, so GET finds the keys it wrote (about 40 % of the key space). {resp_repeat} alternating rounds, medians; "
       "`us/req` is server CPU per request.", "",
       "| command | pipeline | Flux-KV requests/s | Redis requests/s | Flux-KV / Redis | us/req Flux-KV | us/req Redis |",
       "|---|---|---|---|---|---|---|"]
for test in ("set", "get"):
    for p in (1, 16):
        med = {}
        for server in ("Flux-KV", "Redis"):
            rs = [r for r in rrows if r["server"] == server and r["test"] == test and r["pipeline"] == p]
            med[server] = (statistics.median(r["rps"] for r in rs),
                           statistics.median(10000 * r["server_cpu"] / r["rps"] for r in rs))
        (f, fu), (r_, ru) = med["Flux-KV"], med["Redis"]
        md.append(f"| {test.upper()} | {p} | {f:,.0f} | {r_:,.0f} | {f / r_:.2f}x | {fu:.2f} | {ru:.2f} |")
md += ["", "Every run: " + ", ".join(f"{r['server']} {r['test'].upper()} P{r['pipeline']} {r['rps']:,}" for r in rrows) + "."]
open(f"{results}/vs-redis.md", "w").write("\n".join(md) + "\n")
json.dump({"runs": rows, "metrics": mrows, "resp": rrows}, open(f"{results}/vs-redis.json", "w"), indent=1)
print("\n".join(md))
PY
