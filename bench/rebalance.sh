#!/usr/bin/env bash
# Client throughput while slots move. Node A owns every slot (4,096) and holds KEYS keys of
# VALUE_BYTES; node B joins and `flux-cli cluster rebalance --parallel P` moves half the
# slots to it (for each P in PARALLEL, alternating) while a client keeps reading and
# writing through the cluster client
# (flux-bench --follow-slots: C connections, one request at a time, SET:GET 1:1 over
# KEYS random keys; MOVED and TRY_AGAIN are followed inside the client, as an application
# would see them). Layout: both nodes (1 shard core each, their control cores too) on
# SERVER_CPU; the client, etcd and flux-cli on CLIENT_CPU; persistence off.
#
# From the client's timeline (100 ms buckets): throughput before the rebalance, during it
# and after it; the slowest request during it. From the target's log: keys and bytes
# copied, and each slot's hold (writes held on the source) to flip (ownership committed in
# etcd). REPEAT rounds of each P; medians of each round's figures and ratios. Writes
# bench/results/rebalance.md.
source "$(dirname "$0")/lib.sh"
KEYS=${KEYS:-200000}
VALUE_BYTES=${VALUE_BYTES:-100}
C=${C:-64}
PARALLEL=${PARALLEL:-1 4}
BEFORE_S=${BEFORE_S:-8}
WINDOW_S=${WINDOW_S:-50}
REPEAT=${REPEAT:-3}
need etcd etcd-server
build
ROWS="$WORK/rows.jsonl"
: >"$ROWS"

# node DIR ID ENDPOINT: starts a node; sets NODE_PID and NODE_PORT once it is registered.
node() {
  NODE_PORT=$(free_port)
  "$BIN/flux-server" --listen "127.0.0.1:$NODE_PORT" --metrics-listen "" --data-dir "$1/$2" --log-level info \
    --cpus "$SERVER_CPU" --control-cpu "$SERVER_CPU" --persistence-enabled false \
    --cluster-etcd-endpoints "$3" --cluster-node-id "$2" >/dev/null 2>"$1/$2.log" &
  NODE_PID=$!
  PIDS+=("$NODE_PID")
  wait_port "$NODE_PORT"
  until "$BIN/flux-cli" --etcd "$3" nodes 2>/dev/null | grep -q "^$2 "; do sleep 0.05; done
}

# round N P
round() {
  local dir="$WORK/round$1-p$2"
  mkdir -p "$dir"
  local port peer
  port=$(free_port)
  peer=$(free_port)
  taskset -c "$CLIENT_CPU" etcd --data-dir "$dir/etcd" --listen-client-urls "http://127.0.0.1:$port" \
    --advertise-client-urls "http://127.0.0.1:$port" --listen-peer-urls "http://127.0.0.1:$peer" \
    --initial-advertise-peer-urls "http://127.0.0.1:$peer" --initial-cluster "default=http://127.0.0.1:$peer" \
    >"$dir/etcd.log" 2>&1 &
  local etcd_pid=$!
  PIDS+=("$etcd_pid")
  wait_port "$port"
  local ep="127.0.0.1:$port"
  node "$dir" a "$ep"
  local a_pid=$NODE_PID
  log "round $1: loading $KEYS keys of $VALUE_BYTES B into a"
  taskset -c "$CLIENT_CPU" "$BIN/flux-bench" --etcd "$ep" -c 50 -P 16 -n "$KEYS" --value-bytes "$VALUE_BYTES" \
    --json >/dev/null
  node "$dir" b "$ep"
  local b_pid=$NODE_PID
  taskset -c "$CLIENT_CPU" "$BIN/flux-bench" --etcd "$ep" --follow-slots --duration "${WINDOW_S}s" -c "$C" \
    --ratio 1:1 --keys "$KEYS" --value-bytes "$VALUE_BYTES" >"$dir/load.json" &
  local load_pid=$!
  local t0 r0 r1
  t0=$(date +%s.%N)
  sleep "$BEFORE_S"
  r0=$(date +%s.%N)
  log "round $1: rebalancing with --parallel $2"
  taskset -c "$CLIENT_CPU" "$BIN/flux-cli" --etcd "$ep" cluster rebalance --parallel "$2" >"$dir/rebalance.out"
  r1=$(date +%s.%N)
  wait "$load_pid"
  python3 - "$dir" "$2" "$t0" "$r0" "$r1" "$BEFORE_S" "$WINDOW_S" >>"$ROWS" <<'PY'
import json, re, statistics, sys
d, parallel, (t0, r0, r1, before_s, window_s) = sys.argv[1], int(sys.argv[2]), map(float, sys.argv[3:])
load = json.load(open(f"{d}/load.json"))
tick = load["timeline_ms"] / 1000
line = load["timeline"]
def window(a, b):
    bs = line[int(a / tick):int(b / tick)]
    return (sum(x[0] for x in bs) / (len(bs) * tick) if bs else 0.0), (max((x[2] for x in bs), default=0))
start, end = r0 - t0, r1 - t0
before, _ = window(1.0, start)
during, slowest = window(start, end)
after, _ = window(end + 1.0, window_s - 0.5)
holds, keys, nbytes, copies = [], 0, 0, 0
for l in open(f"{d}/b.log"):
    if "slot now owned here" in l:
        f = dict(re.findall(r"(\w+)=(\d+)", l))
        holds.append(int(f["held_ms"])); keys += int(f["keys"]); nbytes += int(f["bytes"]); copies += 1
print(json.dumps({"parallel": parallel, "before": before, "during": during, "after": after, "slowest_us": slowest,
                  "rebalance_s": end - start, "keys": keys, "bytes": nbytes, "slots": copies,
                  "hold_p50": statistics.median(holds), "hold_p99": sorted(holds)[int(0.99 * (len(holds) - 1))],
                  "hold_max": max(holds), "errors": load["errors"], "requests": load["requests"],
                  "window_ok": end < window_s - 2}))
PY
  log "round $1: $(tail -1 "$ROWS")"
  stop_pid "$a_pid"
  stop_pid "$b_pid"
  stop_pid "$etcd_pid"
}

for rep in $(seq 1 "$REPEAT"); do
  for p in $PARALLEL; do
    round "$rep" "$p"
  done
done

python3 - "$ROWS" "$RESULTS/rebalance.md" "$KEYS" "$VALUE_BYTES" "$C" "$REPEAT" "$SERVER_CPU" "$CLIENT_CPU" <<'PY'
import json, statistics, sys, datetime
rows_file, out, keys, vb, c, repeat, server_cpu, client_cpu = sys.argv[1:]
rows = [json.loads(l) for l in open(rows_file) if l.strip()]
for r in rows:
    r["during_before"] = r["during"] / r["before"]
    r["after_before"] = r["after"] / r["before"]
    r["during_after"] = r["during"] / r["after"]
    r["keys_s"] = r["keys"] / r["rebalance_s"]
    r["mb_s"] = r["bytes"] / 1e6 / r["rebalance_s"]
    # Requests the client did not make because of the rebalance, against its rate before.
    r["forgone"] = (r["before"] - r["during"]) * r["rebalance_s"]
parallels = sorted({r["parallel"] for r in rows})
md = ["# Rebalance: client throughput while slots move", "",
      f"Measured by `bench/rebalance.sh` on {datetime.date.today()}. Node A owns all 4,096 slots and holds "
      f"{int(keys):,} keys of {vb} B; node B joins and `flux-cli cluster rebalance --parallel P` moves "
      f"2,048 slots to it while a client reads and writes through the cluster client ({c} connections, one "
      "request at a time, SET:GET 1:1, MOVED and TRY_AGAIN followed inside the client). Both nodes (one shard "
      f"core each, control cores too) on CPU {server_cpu}; client, etcd and flux-cli on CPU {client_cpu}; "
      f"persistence off; release build. {repeat} rounds of each P, alternating; medians of each round's "
      "figures and ratios.", "",
      "| P | round | before (req/s) | during | during / before | after | after / before | during / after | rebalance | keys copied | MB copied | keys/s | MB/s | requests forgone | slowest request during | hold-to-flip p50 / p99 / max | client errors |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
def row(p, name, r):
    return (f"| {p} | {name} | {r['before']:,.0f} | {r['during']:,.0f} | {r['during_before']:.2f}x | {r['after']:,.0f} | "
            f"{r['after_before']:.2f}x | {r['during_after']:.2f}x | {r['rebalance_s']:.1f} s | {r['keys']:,.0f} | {r['bytes'] / 1e6:.1f} | "
            f"{r['keys_s']:,.0f} | {r['mb_s']:.2f} | {r['forgone'] / 1e6:.2f} M | "
            f"{r['slowest_us'] / 1000:.1f} ms | {r['hold_p50']} / {r['hold_p99']} / {r['hold_max']} ms | {r['errors']} |")
medians = {}
for p in parallels:
    mine = [r for r in rows if r["parallel"] == p]
    for i, r in enumerate(mine, 1):
        md.append(row(p, str(i), r))
    m = {k: statistics.median(r[k] for r in mine) for k in mine[0] if k not in ("parallel", "window_ok")}
    medians[p] = m
    md.append(row(p, "**median**", m))
best = max(parallels, key=lambda p: medians[p]["during_before"])
ratio = medians[best]["during_before"]
md += ["", f"- Throughput during the rebalance: **{ratio:.2f}x** of before at --parallel {best}, the best "
       f"of the settings measured (target 0.7x): {'met' if ratio >= 0.7 else 'not met'}. "
       + "; ".join(f"--parallel {p}: {medians[p]['during_before']:.2f}x for {medians[p]['rebalance_s']:.1f} s"
                   for p in parallels) + ".",
       f"- Longest write hold of a slot, from the source holding its writes to the flip committed in etcd: "
       f"**{max(r['hold_max'] for r in rows)} ms** over {sum(r['slots'] for r in rows):,} slot moves "
       f"(target under 50 ms): {'met' if max(r['hold_max'] for r in rows) < 50 else 'not met'}. The slowest "
       "client request during the rebalance (the column above) also includes its MOVED and TRY_AGAIN "
       "round trips and the client's resend pauses.",
       "- After / before is what this layout costs by itself, with no slot moving: after the rebalance the "
       "same load is served by two processes that share one CPU, where before one served it. During / after "
       "isolates what the migration costs the client beside that.",
       "- Requests forgone: (before - during) x rebalance time, what the rebalance cost the client in all; "
       "a faster rebalance costs more per second and less in all.",
       "- Keys copied include keys sent again because they were written during their slot's copy."]
if not all(r["window_ok"] for r in rows):
    md.append("- Warning: a rebalance did not finish inside the client's window; raise WINDOW_S.")
open(out, "w").write("\n".join(md) + "\n")
print("\n".join(md))
PY
