#!/usr/bin/env bash
# The cost of TLS and of authentication, side by side in one run: flux-server with one
# shard core (on SERVER_CPU, persistence off) in four set-ups: plaintext, plaintext with
# auth (every connection authenticates once, before the measured requests), TLS, and TLS
# with auth. flux-bench -c C SET on CLIENT_CPU, without pipelining (N requests) and with
# -P 16 (4 * N). ROUNDS rounds alternate the set-ups; the report takes medians.
# Writes bench/results/tls.md.
source "$(dirname "$0")/lib.sh"
N=${N:-200000}
C=${C:-100}
ROUNDS=${ROUNDS:-3}
need bc bc
need openssl openssl
build

# A CA and a server certificate for localhost / 127.0.0.1 (ECDSA P-256, as a modern
# deployment would use).
PKI="$WORK/pki"; mkdir -p "$PKI"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj "/CN=bench CA" \
  -keyout "$PKI/ca.key" -out "$PKI/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=localhost" \
  -keyout "$PKI/server.key" -out "$PKI/server.csr" 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' >"$PKI/ext"
openssl x509 -req -in "$PKI/server.csr" -CA "$PKI/ca.pem" -CAkey "$PKI/ca.key" -CAcreateserial -days 2 \
  -extfile "$PKI/ext" -out "$PKI/server.pem" 2>/dev/null
"$BIN/flux-cli" token new --user bench --role write >"$WORK/token.out"
grep -v '^#' "$WORK/token.out" | head -1 >"$PKI/bench.token"
grep -v '^#' "$WORK/token.out" | tail -n +2 >"$PKI/users.toml"

TLS_SERVER=(--tls-cert-file "$PKI/server.pem" --tls-key-file "$PKI/server.key")
AUTH_SERVER=(--auth-users-file "$PKI/users.toml")
TLS_CLIENT=(--tls-ca "$PKI/ca.pem")
AUTH_CLIENT=(--token-file "$PKI/bench.token")
SETUPS=(plaintext plaintext+auth tls tls+auth)

RAW="$WORK/raw.tsv"; : >"$RAW"
run() {  # run SETUP PIPELINE
  local setup=$1 p=$2 server=() client=()
  case $setup in
    plaintext) ;;
    plaintext+auth) server=("${AUTH_SERVER[@]}"); client=("${AUTH_CLIENT[@]}") ;;
    tls) server=("${TLS_SERVER[@]}"); client=("${TLS_CLIENT[@]}") ;;
    tls+auth) server=("${TLS_SERVER[@]}" "${AUTH_SERVER[@]}"); client=("${TLS_CLIENT[@]}" "${AUTH_CLIENT[@]}") ;;
  esac
  local n=$N; [ "$p" -gt 1 ] && n=$((4 * N))
  start_flux "$setup" --cores 1 --cpus "$SERVER_CPU" --persistence-enabled false "${server[@]}"
  measure "$FLUX_PID" "$WORK/run.json" "$BIN/flux-bench" --addr "127.0.0.1:$FLUX_PORT" -c "$C" -n "$n" -P "$p" \
    --json "${client[@]}"
  stop_pid "$FLUX_PID"
  local qps p99 errors
  qps=$(json_field "$WORK/run.json" qps | cut -d. -f1)
  p99=$(json_field "$WORK/run.json" latency_us.p99)
  errors=$(json_field "$WORK/run.json" errors)
  [ "$errors" = 0 ] || { log "$setup -P $p: $errors errors"; exit 1; }
  printf '%s\t%s\t%s\t%s\t%s\n' "$setup" "$p" "$qps" "$SERVER_CPU_PCT" "$p99" >>"$RAW"
  log "round $round: $setup -P $p: $qps/s, server CPU $SERVER_CPU_PCT %, p99 $p99 us"
}

for round in $(seq 1 "$ROUNDS"); do
  # Alternate the order each round, so drift on the shared machine does not favour one.
  order=("${SETUPS[@]}")
  [ $((round % 2)) -eq 0 ] && order=(tls+auth tls plaintext+auth plaintext)
  for p in 1 16; do
    for setup in "${order[@]}"; do run "$setup" "$p"; done
  done
done

python3 - "$RAW" "$RESULTS/tls.md" "$N" "$C" "$ROUNDS" "$SERVER_CPU" "$CLIENT_CPU" <<'PY'
import statistics, sys
raw, out, n, c, rounds, scpu, ccpu = sys.argv[1:]
runs = {}
for line in open(raw):
    setup, p, qps, cpu, p99 = line.split("\t")
    runs.setdefault((setup, int(p)), []).append((int(qps), int(cpu), float(p99)))
med = {}
for k, v in runs.items():
    qps = statistics.median(r[0] for r in v)
    cpu = statistics.median(r[1] for r in v)
    us = statistics.median(r[1] / 100 / r[0] * 1e6 for r in v)
    p99 = statistics.median(r[2] for r in v)
    med[k] = (qps, cpu, us, p99, min(r[0] for r in v), max(r[0] for r in v))
setups = ["plaintext", "plaintext+auth", "tls", "tls+auth"]
lines = [
    "# TLS and authentication cost",
    "",
    f"`bench/tls.sh`: flux-server with 1 shard core on CPU {scpu} (persistence off), flux-bench on CPU {ccpu},",
    f"SET, {c} connections, {n} requests without pipelining and {4 * int(n)} with `-P 16`. Medians of",
    f"{rounds} rounds that alternate the order of the set-ups. TLS: 1.3, ECDSA P-256 certificate, rustls",
    "(ring) driven from the core's io_uring. Auth: every connection sends one Auth request (token",
    "check) before the measured requests; after that, each request costs one role check.",
    "CPU per request = server process CPU time / requests.",
    "",
    "| set-up | pipeline | requests/s | runs (min-max) | vs plaintext | server CPU | CPU per request | p99 |",
    "|---|---|---|---|---|---|---|---|",
]
for p in (1, 16):
    base = med[("plaintext", p)][0]
    for s in setups:
        qps, cpu, us, p99, lo, hi = med[(s, p)]
        lines.append(
            f"| {s} | {p} | {qps:,.0f} | {lo / 1000:,.0f}K-{hi / 1000:,.0f}K | {qps / base:.2f}x | {cpu:.0f} % | {us:.2f} us | {p99 / 1000:.2f} ms |"
        )
tls16 = med[("tls", 16)][0] / med[("plaintext", 16)][0]
tls1 = med[("tls", 1)][0] / med[("plaintext", 1)][0]
auth1 = med[("plaintext+auth", 1)][2] / med[("plaintext", 1)][2]
auth16 = med[("plaintext+auth", 16)][2] / med[("plaintext", 16)][2]
tauth1 = med[("tls+auth", 1)][2] / med[("tls", 1)][2]
tauth16 = med[("tls+auth", 16)][2] / med[("tls", 16)][2]
# Does each authenticated median fall inside the run-to-run range of the same set-up
# without auth? Then the difference is not measurable on this machine.
inside = all(
    med[(base, p)][4] <= med[(base + "+auth", p)][0] <= med[(base, p)][5]
    for base in ("plaintext", "tls")
    for p in (1, 16)
)
verdict = (
    "Each authenticated median lies inside the min-max range of the same set-up without auth:"
    " the difference is smaller than the run-to-run noise, so no cost is measurable."
    if inside
    else "At least one authenticated median lies outside the range of its set-up without auth:"
    " see the rows above for the measurable difference."
)
lines += [
    "",
    f"- TLS at `-P 16` keeps **{tls16:.2f}x** of plaintext throughput (target: at least 0.7x); without",
    f"  pipelining {tls1:.2f}x.",
    f"- Authentication, once the connection is authenticated: CPU per request {auth1:.2f}x of plaintext",
    f"  without pipelining and {auth16:.2f}x with `-P 16`; over TLS, {tauth1:.2f}x and {tauth16:.2f}x of TLS alone.",
    "  " + verdict,
    "",
    "Every round:",
    "",
    "| set-up | pipeline | requests/s | server CPU % | p99 us |",
    "|---|---|---|---|---|",
]
for line in open(raw):
    s, p, qps, cpu, p99 = line.strip().split("\t")
    lines.append(f"| {s} | {p} | {int(qps):,} | {cpu} | {p99} |")
open(out, "w").write("\n".join(lines) + "\n")
print("\n".join(lines[:20]))
PY
