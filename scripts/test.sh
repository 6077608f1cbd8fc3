#!/usr/bin/env bash
# The one test command. Makes a fresh Debian 12 machine ready (packages, RabbitMQ), then runs
# formatting and lint checks and the whole test suite. Tests start their own flux-server
# processes (and their own etcd, on free ports) and stop them at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '==> %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# Debian packages the build and the tests need, by the command that proves each is there.
ensure_packages() {
  local missing=()
  # The build brings its own protoc (scripts/protoc); Debian's is for the Python client in
  # tests/security.rs, whose generated code must match Debian's python3-protobuf.
  command -v protoc >/dev/null || missing+=(protobuf-compiler)
  command -v rabbitmq-server >/dev/null || missing+=(rabbitmq-server)
  command -v etcd >/dev/null || missing+=(etcd-server)
  command -v etcdctl >/dev/null || missing+=(etcd-client)
  command -v redis-server >/dev/null || missing+=(redis-server)  # side-by-side benchmarks
  command -v redis-benchmark >/dev/null || missing+=(redis-tools)
  command -v ss >/dev/null || missing+=(iproute2)
  command -v systemd-analyze >/dev/null || missing+=(systemd)       # checks the unit file
  command -v stunnel >/dev/null || missing+=(stunnel4)              # TLS in front of RabbitMQ
  command -v promtool >/dev/null || missing+=(prometheus)           # checks the /metrics output
  command -v openssl >/dev/null || missing+=(openssl)               # certificates for bench/tls.sh
  # The independent client in tests/security.rs: Debian's python3 with its protobuf module.
  /usr/bin/python3 -c 'import google.protobuf' 2>/dev/null || missing+=(python3 python3-protobuf)
  # redis-py, a Redis client nobody here wrote, for tests/resp.rs.
  /usr/bin/python3 -c 'import redis' 2>/dev/null || missing+=(python3-redis)
  # xxh3 for the Python client's shard-aware routing (tests/python_client.rs).
  /usr/bin/python3 -c 'import xxhash' 2>/dev/null || missing+=(python3-xxhash)
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

# RabbitMQ for the CDC tests: start it when nothing listens on 5672, then poll until ready.
ensure_rabbitmq() {
  if ss -ltn 'sport = :5672' | grep -q LISTEN; then
    return
  fi
  log "starting RabbitMQ"
  as_root rabbitmq-server -detached >/dev/null 2>&1 || true
  for _ in $(seq 1 120); do
    if as_root rabbitmqctl status >/dev/null 2>&1 && ss -ltn 'sport = :5672' | grep -q LISTEN; then
      log "RabbitMQ is ready"
      return
    fi
    sleep 0.5
  done
  log "RabbitMQ did not become ready"
  exit 1
}

ensure_packages
ensure_rabbitmq

log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy"
cargo clippy --all-targets --locked -- -D warnings
log "cargo test"
# Doc tests (the crate docs' examples) are not part of --all-targets.
out=$(mktemp)
trap 'rm -f "$out"' EXIT
cargo test --all-targets --locked 2>&1 | tee "$out"
cargo test --doc --locked 2>&1 | tee -a "$out"
# One closing line for the whole suite (cargo prints one per test binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "summary: %d passed, %d failed\n", p, f }' "$out"
