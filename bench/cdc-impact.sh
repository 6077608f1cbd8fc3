#!/usr/bin/env bash
# What change data capture costs, side by side in one run, in the fair layout: one shard
# core with the control core on the same CPU (SERVER_CPU), the client on CLIENT_CPU,
# flux-bench -c 100 -n 500000 SET (the old service's workload), real RabbitMQ on this
# machine with a consumer bound to the exchange. CDC off and on alternate REPEAT times, with
# persistence off and on (fsync everysec); medians are reported.
#
# Per run: requests/s, and the server's CPU per write (process CPU from the start of the
# load until the broker confirmed every event, over the writes). The CDC cost per write is
# the on - off difference of the medians. Then the write-to-confirm delay at a steady
# 10,000 writes/s (--rate), where batching, log syncs and confirms, not a backlog, decide it.
# Writes bench/results/cdc-impact.md.
source "$(dirname "$0")/lib.sh"
N=${N:-500000}
C=${C:-100}
REPEAT=${REPEAT:-3}
RATE=${RATE:-10000}
RATE_N=${RATE_N:-100000}
need bc bc
need rabbitmqctl rabbitmq-server
build
(cd "$ROOT" && cargo build --release --locked --bin flux-cdc-tail >&2)
EXCHANGE="bench.cdc.$$"
AMQP=${AMQP:-amqp://guest:guest@127.0.0.1:5672/%2f}

# The write-to-confirm delay of the server on FLUX_PORT: "P50 / P99" in ms.
confirm_delay() {
  echo "$(flux_stat "$FLUX_PORT" cdc.confirm_delay_p50_ms) / $(flux_stat "$FLUX_PORT" cdc.confirm_delay_p99_ms)"
}

# Waits until the broker confirmed $1 events; sets DRAIN_S.
wait_confirmed() {
  local t0; t0=$(date +%s.%N)
  for _ in $(seq 1 1200); do
    [ "$(flux_stat "$FLUX_PORT" cdc.events_published)" = "$1" ] && break
    sleep 0.05
  done
  DRAIN_S=$(echo "$(date +%s.%N) - $t0" | bc -l)
}

# CPU seconds of the threads of process $1 whose names start with $2 (flux-core: the shard
# core; flux-control: the control core).
thread_seconds() {
  local t sum=0
  for t in /proc/"$1"/task/*; do
    case "$(cat "$t/comm" 2>/dev/null)" in
      "$2"*) sum=$(awk -v hz="$(getconf CLK_TCK)" -v s="$sum" '{ print s + ($14 + $15) / hz }' "$t/stat") ;;
    esac
  done
  echo "$sum"
}
us_per_write() { printf '%.2f' "$(echo "1000000 * ($2 - $1) / $3" | bc -l)"; }

declare -A QPS CPU_US CORE_US CTL_US
rows=()
# run LABEL CDC PERSISTENCE [SERVER-ARGS...]: one saturating run.
run() {
  local label=$1 cdc=$2 persist=$3
  shift 3
  start_flux "$label" --cores 1 --cpus "$SERVER_CPU" --control-cpu "$SERVER_CPU" \
    --persistence-enabled "$persist" --cdc-enabled "$cdc" --cdc-exchange "$EXCHANGE" --cdc-amqp-url "$AMQP" "$@"
  local out="$WORK/$label.json" c0 c1 s0 s1 k0 k1 extra="-"
  c0=$(cpu_seconds "$FLUX_PID"); s0=$(thread_seconds "$FLUX_PID" flux-core); k0=$(thread_seconds "$FLUX_PID" flux-control)
  measure "$FLUX_PID" "$out" "$BIN/flux-bench" --addr "127.0.0.1:$FLUX_PORT" -c "$C" -n "$N" --json
  if [ "$cdc" = true ]; then
    wait_confirmed "$N"
    extra="write-to-confirm p50 / p99 $(confirm_delay) ms; confirmed $(printf '%.2f' "$DRAIN_S") s after the load"
  fi
  c1=$(cpu_seconds "$FLUX_PID"); s1=$(thread_seconds "$FLUX_PID" flux-core); k1=$(thread_seconds "$FLUX_PID" flux-control)
  stop_pid "$FLUX_PID"
  QPS[$label]=$(json_field "$out" qps | cut -d. -f1)
  CPU_US[$label]=$(us_per_write "$c0" "$c1" "$N")
  CORE_US[$label]=$(us_per_write "$s0" "$s1" "$N")
  CTL_US[$label]=$(us_per_write "$k0" "$k1" "$N")
  rows+=("| $label | $cdc | $persist | ${QPS[$label]} | ${CPU_US[$label]} | ${CORE_US[$label]} | ${CTL_US[$label]} | $(json_field "$out" latency_us.p50) / $(json_field "$out" latency_us.p99) | $extra |")
  log "$label: ${QPS[$label]} req/s, ${CPU_US[$label]} us server CPU per write ($extra)"
}

# steady LABEL PERSISTENCE: RATE writes/s with CDC on; the write-to-confirm delay.
steady_rows=()
steady() {
  local label=$1 persist=$2
  start_flux "$label" --cores 1 --cpus "$SERVER_CPU" --control-cpu "$SERVER_CPU" \
    --persistence-enabled "$persist" --cdc-enabled true --cdc-exchange "$EXCHANGE" --cdc-amqp-url "$AMQP"
  local out="$WORK/$label.json"
  measure "$FLUX_PID" "$out" "$BIN/flux-bench" --addr "127.0.0.1:$FLUX_PORT" -c 10 -n "$RATE_N" --rate "$RATE" --json
  wait_confirmed "$RATE_N"
  local delay; delay=$(confirm_delay)
  stop_pid "$FLUX_PID"
  steady_rows+=("| $persist | $(json_field "$out" qps | cut -d. -f1) | $delay | $SERVER_CPU_PCT % |")
  log "$label: write-to-confirm p50 / p99 $delay ms at $RATE writes/s"
}

# The broker runs beside the client on CLIENT_CPU, so its work never lands on the server's CPU.
for pid in $(pgrep -f beam.smp); do taskset -apc "$CLIENT_CPU" "$pid" >/dev/null; done
# Consumer side: flux-cdc-tail keeps a queue bound (so every event is routed and stored).
taskset -c "$CLIENT_CPU" "$BIN/flux-cdc-tail" --amqp-url "$AMQP" --exchange "$EXCHANGE" --idle-timeout 600s >/dev/null 2>"$WORK/tail.err" &
PIDS+=($!)
for _ in $(seq 1 100); do grep -q ready "$WORK/tail.err" && break; sleep 0.1; done

for i in $(seq 1 "$REPEAT"); do
  for p in false true; do
    run "off-p$p-$i" false "$p"
    run "on-p$p-$i" true "$p"
  done
  # The option for co-located control cores: the lowest priority (persistence off).
  run "on-nice19-$i" true false --control-nice 19
done
steady steady-pfalse false
steady steady-ptrue true

median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
summary=()
for p in false true; do
  qoff=(); qon=(); coff=(); con=(); soff=(); son=(); kon=()
  for i in $(seq 1 "$REPEAT"); do
    qoff+=("${QPS[off-p$p-$i]}"); qon+=("${QPS[on-p$p-$i]}")
    coff+=("${CPU_US[off-p$p-$i]}"); con+=("${CPU_US[on-p$p-$i]}")
    soff+=("${CORE_US[off-p$p-$i]}"); son+=("${CORE_US[on-p$p-$i]}"); kon+=("${CTL_US[on-p$p-$i]}")
  done
  mqoff=$(median "${qoff[@]}"); mqon=$(median "${qon[@]}")
  mcoff=$(median "${coff[@]}"); mcon=$(median "${con[@]}")
  msoff=$(median "${soff[@]}"); mson=$(median "${son[@]}"); mkon=$(median "${kon[@]}")
  cost=$(printf '%.2f' "$(echo "$mcon - $mcoff" | bc -l)")
  core_cost=$(printf '%.2f' "$(echo "$mson - $msoff" | bc -l)")
  summary+=("| $p | $mqoff | $mqon | **$(ratio "$mqon" "$mqoff")x** | $mcoff | $mcon | **$cost** | $core_cost | $mkon |")
  if [ "$p" = false ]; then
    qn=(); cn=(); sn=(); kn=()
    for i in $(seq 1 "$REPEAT"); do
      qn+=("${QPS[on-nice19-$i]}"); cn+=("${CPU_US[on-nice19-$i]}")
      sn+=("${CORE_US[on-nice19-$i]}"); kn+=("${CTL_US[on-nice19-$i]}")
    done
    mqn=$(median "${qn[@]}"); mcn=$(median "${cn[@]}"); msn=$(median "${sn[@]}"); mkn=$(median "${kn[@]}")
    summary+=("| false, \`control_nice = 19\` | $mqoff | $mqn | **$(ratio "$mqn" "$mqoff")x** | $mcoff | $mcn | **$(printf '%.2f' "$(echo "$mcn - $mcoff" | bc -l)")** | $(printf '%.2f' "$(echo "$msn - $msoff" | bc -l)") | $mkn |")
  fi
done

{
  echo "# Change data capture: what it costs"
  echo
  echo "Measured by \`bench/cdc-impact.sh\` on $(date -u +%Y-%m-%d): $NPROC CPUs, Linux $(uname -r), RabbitMQ"
  echo "$(dpkg-query -W -f '${Version}' rabbitmq-server 2>/dev/null) on the same machine (pinned to CPU $CLIENT_CPU) with a consumer queue bound to the exchange."
  echo "Fair layout: 1 shard core and the control core pinned to CPU $SERVER_CPU, flux-bench on CPU $CLIENT_CPU,"
  echo "\`-c $C -n $N\` SET. CPU per write = CPU time from the start of the load until the broker"
  echo "confirmed every event, over the writes: of the whole process, of the shard core's thread"
  echo "(flux-core-*) and of the control core's thread (flux-control), from /proc. Medians of $REPEAT"
  echo "alternating runs. The old service lost 23.5 % (0.765x) of its throughput with CDC on."
  echo
  echo "| persistence | off req/s | on req/s | on/off | process CPU/write off (us) | on (us) | CDC cost per write (us) | of it: shard core (us) | of it: control core (us) |"
  echo "|---|---|---|---|---|---|---|---|---|"
  printf '%s\n' "${summary[@]}"
  echo
  echo "Write-to-confirm delay at a steady $RATE writes/s (10 connections, CDC on, fsync everysec when"
  echo "persistence is on), from the node's Stats:"
  echo
  echo "| persistence | req/s | write-to-confirm p50 / p99 (ms) | server CPU |"
  echo "|---|---|---|---|"
  printf '%s\n' "${steady_rows[@]}"
  echo
  echo "All runs:"
  echo
  echo "| run | CDC | persistence | req/s | process CPU per write (us) | shard core (us) | control core (us) | client p50 / p99 (us) | change capture |"
  echo "|---|---|---|---|---|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
} >"$RESULTS/cdc-impact.md"
cat "$RESULTS/cdc-impact.md"
