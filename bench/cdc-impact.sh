#!/usr/bin/env bash
# The old service's CDC experiment, side by side in one run: flux-bench -c 100 -n 500000
# SET with change data capture off, then on (real RabbitMQ on this machine, a durable queue
# bound to the exchange so every event is stored, as a consumer would have it). Reports the
# on/off ratio, the events/s the forwarder sustained, and the write-to-confirm delay.
# Writes bench/results/cdc-impact.md and .json.
source "$(dirname "$0")/lib.sh"
N=${N:-500000}
C=${C:-100}
need bc bc
need rabbitmqctl rabbitmq-server
build
(cd "$ROOT" && cargo build --release --locked --bin flux-cdc-tail --bin flux-cli >&2)
EXCHANGE="bench.cdc.$$"
QUEUE="bench.cdc.$$"
AMQP=${AMQP:-amqp://guest:guest@127.0.0.1:5672/%2f}

rows=()
run() {  # run LABEL CDC(true|false) SERVER-ARGS...
  local label=$1 cdc=$2; shift 2
  start_flux "$label" --persistence-enabled false --cdc-enabled "$cdc" --cdc-exchange "$EXCHANGE" --cdc-amqp-url "$AMQP" "$@"
  local out="$WORK/$label.json"
  measure "$FLUX_PID" "$out" "$BIN/flux-bench" --addr "127.0.0.1:$FLUX_PORT" -c "$C" -n "$N" --json
  local qps; qps=$(json_field "$out" qps | cut -d. -f1)
  local cdc_line="-"
  if [ "$cdc" = true ]; then
    # Wait until the forwarder has everything confirmed, then read its counters.
    local t0 t1; t0=$(date +%s.%N)
    for _ in $(seq 1 600); do
      "$BIN/flux-cli" --addr "127.0.0.1:$FLUX_PORT" stats >"$WORK/$label.stats"
      grep -q "events published $N," "$WORK/$label.stats" && break
      sleep 0.05
    done
    t1=$(date +%s.%N)
    cdc_line=$(grep '^cdc:' "$WORK/$label.stats")
    local drain; drain=$(echo "$t1 - $t0" | bc -l)
    local eps; eps=$(printf '%.0f' "$(echo "$N / ($WALL_S + $drain)" | bc -l)")
    cdc_line="$cdc_line; forwarder sustained $eps events/s (bench $WALL_S s + $(printf '%.2f' "$drain") s to confirm the rest)"
  fi
  stop_pid "$FLUX_PID"
  QPS[$label]=$qps
  rows+=("| $label | $cdc | $qps | $SERVER_CPU_PCT % | $(json_field "$out" latency_us.p50) / $(json_field "$out" latency_us.p99) | $cdc_line |")
  log "$label: $qps req/s ($cdc_line)"
}

declare -A QPS
# Consumer side: flux-cdc-tail keeps a queue bound (and counts what it receives).
"$BIN/flux-cdc-tail" --amqp-url "$AMQP" --exchange "$EXCHANGE" --idle-timeout 120s >/dev/null 2>"$WORK/tail.err" &
PIDS+=($!)
for _ in $(seq 1 100); do grep -q ready "$WORK/tail.err" && break; sleep 0.1; done

cpus_all=$(seq -s, 0 $((NPROC - 1)))
# Runs on this shared machine drift by 10-20 %: alternate off and on REPEAT times and
# compare medians.
REPEAT=${REPEAT:-3}
for i in $(seq 1 "$REPEAT"); do
  run "off-${NPROC}cores-$i" false --cores "$NPROC" --cpus "$cpus_all"
  run "on-${NPROC}cores-$i" true --cores "$NPROC" --cpus "$cpus_all"
done
run off-1core false --cores 1 --cpus "$SERVER_CPU"
run on-1core true --cores 1 --cpus "$SERVER_CPU" --control-cpu "$SERVER_CPU"
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
off_all=(); on_all=()
for i in $(seq 1 "$REPEAT"); do off_all+=("${QPS[off-${NPROC}cores-$i]}"); on_all+=("${QPS[on-${NPROC}cores-$i]}"); done
OFF_MED=$(median "${off_all[@]}"); ON_MED=$(median "${on_all[@]}")

{
  echo "# Change data capture: throughput with CDC on vs off"
  echo
  echo "Measured by \`bench/cdc-impact.sh\` on $(date -u +%Y-%m-%d): $NPROC CPUs, Linux $(uname -r), RabbitMQ"
  echo "$(dpkg-query -W -f '${Version}' rabbitmq-server 2>/dev/null) on the same machine, a consumer queue bound to the exchange. flux-bench"
  echo "\`-c $C -n $N\` SET (the old service's workload), client on CPU $CLIENT_CPU. The old service lost"
  echo "23.5 % (0.765x) with CDC on."
  echo
  echo "| run | CDC | requests/s | server CPU | p50 / p99 us | forwarder |"
  echo "|---|---|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
  echo
  echo "- $NPROC shard cores, median of $REPEAT alternating runs: off $OFF_MED, on $ON_MED requests/s: on/off = **$(ratio "$ON_MED" "$OFF_MED")x**"
  echo "- 1 shard core with the control core on the same CPU (one run): on/off = **$(ratio "${QPS[on-1core]}" "${QPS[off-1core]}")x**"
} >"$RESULTS/cdc-impact.md"
cat "$RESULTS/cdc-impact.md"
