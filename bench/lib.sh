# Shared helpers for the benchmark scripts (sourced, not run).
# Absolute numbers drift on a shared machine: every script compares side by side in one run.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RESULTS="$ROOT/bench/results"
BIN="$ROOT/target/release"
NPROC=$(nproc)
# The load generator runs on CPU 0; a single-core server runs on the last CPU.
CLIENT_CPU=${CLIENT_CPU:-0}
SERVER_CPU=${SERVER_CPU:-$((NPROC - 1))}
WORK=$(mktemp -d /tmp/flux-bench.XXXXXX)
PIDS=()

cleanup() {
  for pid in "${PIDS[@]:-}"; do
    [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
  done
  rm -rf "$WORK"
}
trap cleanup EXIT

log() { printf '==> %s\n' "$*" >&2; }

build() {
  log "building release binaries"
  (cd "$ROOT" && cargo build --release --locked --bin flux-server --bin flux-bench --bin flux-cli >&2)
}

need() {  # need COMMAND PACKAGE
  command -v "$1" >/dev/null && return
  log "installing $2"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_port() {  # wait_port PORT
  for _ in $(seq 1 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.05
  done
  log "nothing listens on port $1"; return 1
}

# start_flux NAME ARGS...: starts flux-server, sets FLUX_PID and FLUX_PORT. The metrics
# endpoint listens on METRICS_LISTEN (default: a free port; empty: off).
start_flux() {
  local name=$1; shift
  FLUX_PORT=$(free_port)
  rm -rf "$WORK/$name"
  "$BIN/flux-server" --listen "127.0.0.1:$FLUX_PORT" --metrics-listen "${METRICS_LISTEN-127.0.0.1:0}" --data-dir "$WORK/$name" --log-level warn "$@" \
    2>"$WORK/$name.log" &
  FLUX_PID=$!
  PIDS+=("$FLUX_PID")
  wait_port "$FLUX_PORT"
}

# restart_flux NAME ARGS...: starts flux-server on NAME's existing data directory; sets
# FLUX_PID, FLUX_PORT and READY_S (seconds from launch until it accepts connections, which
# it does only once recovery is done).
restart_flux() {
  local name=$1; shift
  FLUX_PORT=$(free_port)
  local t0; t0=$(date +%s.%N)
  "$BIN/flux-server" --listen "127.0.0.1:$FLUX_PORT" --metrics-listen 127.0.0.1:0 --data-dir "$WORK/$name" --log-level info "$@" \
    2>"$WORK/$name.restart.log" &
  FLUX_PID=$!
  PIDS+=("$FLUX_PID")
  until (exec 3<>"/dev/tcp/127.0.0.1/$FLUX_PORT") 2>/dev/null; do
    kill -0 "$FLUX_PID" 2>/dev/null || { log "flux-server exited during recovery"; return 1; }
    sleep 0.005
  done
  READY_S=$(echo "$(date +%s.%N) - $t0" | bc -l)
}

stop_pid() {
  kill "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

# start_redis [ARGS...]: redis-server pinned to SERVER_CPU, sets REDIS_PID and REDIS_PORT.
start_redis() {
  REDIS_PORT=$(free_port)
  mkdir -p "$WORK/redis-$REDIS_PORT"
  taskset -c "$SERVER_CPU" redis-server --port "$REDIS_PORT" --dir "$WORK/redis-$REDIS_PORT" \
    --save '' --appendonly no --daemonize no --logfile "$WORK/redis-$REDIS_PORT.log" "$@" &
  REDIS_PID=$!
  PIDS+=("$REDIS_PID")
  wait_port "$REDIS_PORT"
}

# CPU seconds (user + system) a process has used so far.
cpu_seconds() {
  awk -v hz="$(getconf CLK_TCK)" '{ print ($14 + $15) / hz }' "/proc/$1/stat"
}

# measure PID OUT COMMAND...: runs COMMAND pinned to CLIENT_CPU with stdout to OUT; sets
# SERVER_CPU_PCT (CPU of PID over the run, % of one core) and WALL_S.
measure() {
  local pid=$1 out=$2; shift 2
  local c0 t0 c1 t1
  c0=$(cpu_seconds "$pid"); t0=$(date +%s.%N)
  taskset -c "$CLIENT_CPU" "$@" >"$out"
  c1=$(cpu_seconds "$pid"); t1=$(date +%s.%N)
  WALL_S=$(echo "$t1 - $t0" | bc -l)
  SERVER_CPU_PCT=$(printf '%.0f' "$(echo "100 * ($c1 - $c0) / $WALL_S" | bc -l)")
}

# json_field FILE KEY[.KEY]: one field of a JSON file (flux-bench --json, flux-cli stats
# --json); a number picks a list element (cores.0.keys).
json_field() {
  python3 -c 'import json,sys
v = json.load(open(sys.argv[1]))
for k in sys.argv[2].split("."): v = v[int(k)] if isinstance(v, list) else v[k]
print(v)' "$1" "$2"
}

# flux_stat PORT KEY[.KEY]: one Stats field of the node on PORT (flux-cli stats --json).
flux_stat() {
  "$BIN/flux-cli" --addr "127.0.0.1:$1" stats --json >"$WORK/stats.json" && json_field "$WORK/stats.json" "$2"
}

# redis_rps FILE: requests/s from redis-benchmark --csv output.
redis_rps() {
  python3 -c 'import csv,sys
rows = list(csv.reader(open(sys.argv[1])))
print(round(float(rows[-1][1])))' "$1"
}

ratio() { printf '%.2f' "$(echo "$1 / $2" | bc -l)"; }
