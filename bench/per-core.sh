#!/usr/bin/env bash
# Throughput per shard core: runs flux-server with 1..NPROC shard cores (one pinned
# executor each) under the same flux-bench load and prints total and per-core QPS.
# Writes bench/results/per-core.md, per-core.json and per-core.png (gnuplot).
#
# The 1-core server runs on the last CPU, clear of the client on CPU 0; with k cores the
# server takes CPUs 0..k-1, so on a small machine the client shares CPU 0 with a shard core.
# WORKLOAD selects flux-bench's keys: distinct (default, the old service's) or one-key.
source "$(dirname "$0")/lib.sh"
N=${N:-500000}
C=${C:-100}
P=${P:-1}
WORKLOAD=${WORKLOAD:-distinct}
need bc bc
need gnuplot gnuplot-nox
build
extra=()
[ "$WORKLOAD" = one-key ] && extra=(--keys 1)
DATA="$WORK/per-core.dat"
: >"$DATA"
rows=()
for cores in $(seq 1 "$NPROC"); do
  if [ "$cores" -eq 1 ]; then cpus=$SERVER_CPU; else cpus=$(seq -s, 0 $((cores - 1))); fi
  log "$cores shard core(s) on CPUs $cpus"
  start_flux "cores$cores" --cores "$cores" --cpus "$cpus" --persistence-enabled false
  out="$WORK/cores$cores.json"
  measure "$FLUX_PID" "$out" "$BIN/flux-bench" --addr "127.0.0.1:$FLUX_PORT" -c "$C" -n "$N" -P "$P" --json "${extra[@]}"
  stop_pid "$FLUX_PID"
  qps=$(json_field "$out" qps | cut -d. -f1)
  per=$((qps / cores))
  per_core=$(python3 -c 'import json,sys
d = json.load(open(sys.argv[1]))
print(", ".join("core %d: %d (%.0f%% fwd)" % (c["core"], c["qps"], 100 * c["forwarded_share"]) for c in d["per_core"]))' "$out")
  # Server CPU per request: the figure that survives a shared machine's noise.
  us=$(printf '%.2f' "$(echo "$SERVER_CPU_PCT / 100 / $qps * 1000000" | bc -l)")
  printf '%s %s %s %s\n' "$cores" "$qps" "$per" "$us" >>"$DATA"
  rows+=("| $cores | $cpus | $qps | $per | $per_core | $SERVER_CPU_PCT % | $us us | $(json_field "$out" client_cpu_percent) % | $(json_field "$out" latency_us.p50) / $(json_field "$out" latency_us.p99) |")
done

# On a machine with as many CPUs as shard cores, the last layout shares the client's CPU:
# say so on the chart, where the drop would otherwise read as the server's doing.
SHARED_NOTE=""
[ "$NPROC" -le 2 ] && SHARED_NOTE="With $NPROC shard cores on $NPROC CPUs, one core shares CPU $CLIENT_CPU with the load generator"

gnuplot <<GP
set terminal pngcairo size 800,480 font "sans,11"
set output "$RESULTS/per-core.png"
set title "Flux-KV SET throughput by shard cores ($C connections, pipeline $P, $WORKLOAD keys, $NPROC CPUs)"
set xlabel "shard cores"
set ylabel "requests/s"
set yrange [0:*]
set offsets 0.3, 0.3, graph 0.15, 0
set xtics 1
set boxwidth 0.35
set style fill solid 0.8
set key top right
set y2label "server CPU per request (us)"
set y2range [0:*]
set y2tics
set label 1 "$SHARED_NOTE" at graph 0.02, graph 0.95 font "sans,9"
plot "$DATA" using (\$1-0.18):2 with boxes title "total", \
     "$DATA" using (\$1+0.18):3 with boxes title "per core", \
     "$DATA" using 1:4 axes x1y2 with linespoints lw 2 pt 7 title "server CPU per request"
GP

{
  echo "# Flux-KV throughput per shard core"
  echo
  echo "Measured by \`bench/per-core.sh\` on $(date -u +%Y-%m-%d): $NPROC CPUs, Linux $(uname -r); flux-bench"
  echo "\`-c $C -n $N -P $P\`, SET, $WORKLOAD keys, client pinned to CPU $CLIENT_CPU. Per-core QPS and the share"
  echo "of each core's requests forwarded to another core come from the server's Stats."
  echo
  echo "| shard cores | CPUs | total requests/s | per core | per core (Stats) | server CPU | server CPU per request | client CPU | p50 / p99 us |"
  echo "|---|---|---|---|---|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
  echo
  echo "![throughput by shard cores](per-core.png)"
  if [ -n "$SHARED_NOTE" ]; then
    echo
    echo "$SHARED_NOTE (flux-bench is pinned there): the $NPROC-core row measures the server and the"
    echo "client competing for one CPU, not what a second core adds. Server CPU per request is the"
    echo "figure to compare across rows."
  fi
} >"$RESULTS/per-core.md"
python3 - "$WORK" "$RESULTS/per-core.json" <<'PY'
import json, sys, glob, os
runs = {os.path.basename(p)[:-5]: json.load(open(p)) for p in sorted(glob.glob(sys.argv[1] + "/cores*.json"))}
json.dump(runs, open(sys.argv[2], "w"), indent=1)
PY
cat "$RESULTS/per-core.md"
