#!/usr/bin/env bash
# Throughput of this build's flux-server beside another build's (BASELINE=path to its
# flux-server, e.g. one built from an earlier commit), 1 shard core on SERVER_CPU, the same
# flux-bench on CLIENT_CPU, persistence off: SET with distinct keys and GET of existing keys
# (64 B values), 100 connections, pipeline 16. REPEAT alternating runs per build; medians.
# BASELINE_LABEL names the baseline in the report (default: its path).
# Writes bench/results/store-throughput.md.
source "$(dirname "$0")/lib.sh"
: "${BASELINE:?set BASELINE to the flux-server binary to compare with}"
N=${N:-2000000}
C=${C:-100}
REPEAT=${REPEAT:-3}
KEYS=${KEYS:-200000}
build
ROWS="$WORK/rows.tsv"
: >"$ROWS"

# start NAME BINARY: a 1-core node without persistence or metrics; sets FLUX_PID/FLUX_PORT.
start() {
  FLUX_PORT=$(free_port)
  rm -rf "$WORK/$1"
  "$2" --listen "127.0.0.1:$FLUX_PORT" --metrics-listen "" --data-dir "$WORK/$1" --log-level warn \
    --cores 1 --cpus "$SERVER_CPU" --persistence-enabled false 2>"$WORK/$1.log" &
  FLUX_PID=$!
  PIDS+=("$FLUX_PID")
  wait_port "$FLUX_PORT"
}

bench() {  # bench BUILD OP ARGS...
  local build=$1 op=$2; shift 2
  measure "$FLUX_PID" "$WORK/run.json" "$BIN/flux-bench" --addr "127.0.0.1:$FLUX_PORT" -c "$C" -P 16 --json "$@"
  printf '%s\t%s\t%s\t%s\n' "$build" "$op" "$(json_field "$WORK/run.json" qps | cut -d. -f1)" "$SERVER_CPU_PCT" >>"$ROWS"
  log "$(tail -1 "$ROWS")"
}

for rep in $(seq 1 "$REPEAT"); do
  for build in this baseline; do
    binary="$BIN/flux-server"; [ "$build" = baseline ] && binary=$BASELINE
    start "$build" "$binary"
    bench "$build" "SET, distinct keys" -n "$N" --value-bytes 64
    stop_pid "$FLUX_PID"
    start "$build" "$binary"
    "$BIN/flux-bench" --addr "127.0.0.1:$FLUX_PORT" -c "$C" -P 16 -n $((5 * KEYS)) --keys "$KEYS" --value-bytes 64 >/dev/null
    bench "$build" "GET, existing keys" -n "$N" --keys "$KEYS" --ratio 0:1
    stop_pid "$FLUX_PID"
  done
done

python3 - "$ROWS" "$RESULTS" "$N" "$C" "$REPEAT" "$SERVER_CPU" "$CLIENT_CPU" "${BASELINE_LABEL:-$BASELINE}" <<'PY'
import sys, statistics, datetime
rows_file, results, n, c, repeat, server_cpu, client_cpu, baseline = sys.argv[1:]
rows = [l.rstrip("\n").split("\t") for l in open(rows_file) if l.strip()]
md = ["# Store throughput: this build beside a baseline build", "",
      f"Measured by `bench/store-throughput.sh` on {datetime.date.today()}: 1 shard core on CPU {server_cpu}, "
      f"persistence and metrics off, flux-bench on CPU {client_cpu}, {c} connections, pipeline 16, {n} requests, "
      f"64 B values; {repeat} alternating runs per build, medians. Baseline: `{baseline}`.", "",
      "| operation | this build, requests/s | baseline | this / baseline | us/req this | us/req baseline |",
      "|---|---|---|---|---|---|"]
for op in dict.fromkeys(r[1] for r in rows):
    med = {}
    for build in ("this", "baseline"):
        rs = [r for r in rows if r[0] == build and r[1] == op]
        med[build] = (statistics.median(int(r[2]) for r in rs),
                      statistics.median(10000 * float(r[3]) / int(r[2]) for r in rs))
    (t, tu), (b, bu) = med["this"], med["baseline"]
    md.append(f"| {op} | {t:,.0f} | {b:,.0f} | {t/b:.2f}x | {tu:.2f} | {bu:.2f} |")
md += ["", "Every run: " + ", ".join(f"{r[0]} {r[1]} {int(r[2]):,}" for r in rows) + "."]
open(f"{results}/store-throughput.md", "w").write("\n".join(md) + "\n")
print("\n".join(md))
PY
