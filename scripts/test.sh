#!/usr/bin/env bash
# The one test command (README, CI): makes sure a Redis server is installed, starts a private one
# on a free port, runs the format check, clippy and every test against it, and stops what it started.
set -euo pipefail
cd "$(dirname "$0")/.."

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

say() { printf '\n==> %s\n' "$*"; }

ensure_redis() {
  if command -v redis-server >/dev/null && command -v redis-cli >/dev/null; then return; fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing redis-server from Debian's packages"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  else
    echo "redis-server is not installed and cannot be installed here (needs root and apt-get)" >&2
    exit 1
  fi
}

free_port() {
  local port
  for _ in $(seq 1 200); do
    # Below Linux's ephemeral range (32768+), where outgoing connections cannot hold the port.
    port=$((20000 + RANDOM % 12000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then echo "$port"; return; fi
  done
  echo "no free port found" >&2; exit 1
}

# A throwaway virtualenv with kubernetes-validate (its schemas ship inside: no cluster, no kubectl).
k8s_venv() {
  local venv="$work/k8s-venv"
  if ! python3 -m venv "$venv" >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      say "installing python3-venv from Debian's packages" >&2
      DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
      python3 -m venv --clear "$venv" >&2
    else
      echo "python3 -m venv does not work here (Debian: apt-get install python3-venv)" >&2
      exit 1
    fi
  fi
  # Its stdout is this function's answer: pip's chatter goes to stderr.
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'kubernetes-validate==1.37.0' >&2
  echo "$venv/bin/python"
}

# start_redis PORT [extra redis-server args...]: a private, disposable server.
start_redis() {
  local port=$1; shift
  local dir="$work/redis-$port"
  mkdir -p "$dir"
  redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --dir "$dir" \
    --logfile "$dir/redis.log" "$@" &
  pids+=($!)
  for _ in $(seq 1 100); do
    redis-cli -p "$port" ping >/dev/null 2>&1 && return
    sleep 0.1
  done
  echo "redis-server on port $port did not start; its log:" >&2
  cat "$dir/redis.log" >&2
  exit 1
}

# start_cluster: three masters (no replicas) with every slot assigned; exports REDIS_CLUSTER_URLS.
start_cluster() {
  local ports=() urls=() nodes=()
  for _ in 1 2 3; do
    local p; p=$(free_port)
    start_redis "$p" --cluster-enabled yes --cluster-config-file "$work/redis-$p/nodes.conf" \
      --cluster-node-timeout 2000
    ports+=("$p"); urls+=("redis://127.0.0.1:$p"); nodes+=("127.0.0.1:$p")
  done
  redis-cli --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes >"$work/cluster-create.log" 2>&1 ||
    { cat "$work/cluster-create.log" >&2; exit 1; }
  for _ in $(seq 1 100); do
    redis-cli -p "${ports[0]}" cluster info 2>/dev/null | grep -q 'cluster_state:ok' && break
    sleep 0.1
  done
  export REDIS_CLUSTER_URLS
  REDIS_CLUSTER_URLS=$(IFS=,; echo "${urls[*]}")
}

# start_sentinel: a master, a replica of it and three sentinels watching it (quorum 2, quick
# failover); exports REDIS_SENTINEL_URLS (the sentinels), REDIS_SENTINEL_MASTER (its name) and
# REDIS_SENTINEL_DATA_URLS (the master, then the replica: the tests' back door).
start_sentinel() {
  local master replica sentinels=() urls=()
  master=$(free_port); start_redis "$master"
  replica=$(free_port); start_redis "$replica" --replicaof 127.0.0.1 "$master"
  for _ in 1 2 3; do
    local p dir; p=$(free_port); dir="$work/sentinel-$p"; mkdir -p "$dir"
    cat >"$dir/sentinel.conf" <<CONF
port $p
bind 127.0.0.1
dir $dir
logfile $dir/sentinel.log
sentinel resolve-hostnames no
sentinel monitor sb-test 127.0.0.1 $master 2
sentinel down-after-milliseconds sb-test 1000
sentinel failover-timeout sb-test 5000
sentinel parallel-syncs sb-test 1
CONF
    redis-server "$dir/sentinel.conf" --sentinel &
    pids+=($!)
    sentinels+=("$p"); urls+=("redis://127.0.0.1:$p")
  done
  for p in "${sentinels[@]}"; do
    for _ in $(seq 1 100); do
      redis-cli -p "$p" sentinel get-master-addr-by-name sb-test 2>/dev/null | grep -q "$master" && break
      sleep 0.1
    done
  done
  # The replica must be in sync before a test may fail over to it.
  for _ in $(seq 1 100); do
    redis-cli -p "$replica" info replication 2>/dev/null | grep -q 'master_link_status:up' && break
    sleep 0.1
  done
  export REDIS_SENTINEL_URLS REDIS_SENTINEL_MASTER=sb-test
  REDIS_SENTINEL_URLS=$(IFS=,; echo "${urls[*]}")
  export REDIS_SENTINEL_DATA_URLS="redis://127.0.0.1:$master,redis://127.0.0.1:$replica"
}

ensure_redis
port=$(free_port)
start_redis "$port"
export REDIS_URL="redis://127.0.0.1:$port"
say "private Redis at $REDIS_URL"
start_cluster
say "private Redis Cluster at $REDIS_CLUSTER_URLS"
start_sentinel
say "private Redis Sentinel setup: sentinels $REDIS_SENTINEL_URLS, master $REDIS_SENTINEL_MASTER"

say "cargo fmt --check"
cargo fmt --all -- --check

say "cargo clippy -D warnings"
cargo clippy --locked --all-targets -- -D warnings

say "cargo test"
cargo test --locked --all-targets

say "Kubernetes manifests: schemas (offline), selectors, and the ConfigMap's broker.toml"
py=$(k8s_venv)
"$py" scripts/k8s_validate.py
# check_config KUSTOMIZATION VAR=value...: its broker.toml with the BROKER__* secrets its
# Deployment passes (dummies: check-config touches no network).
check_config() {
  local k=$1; shift
  "$py" scripts/k8s_validate.py --extract-config "deploy/kubernetes/$k" "$work/broker.toml"
  env "$@" BROKER__ENCRYPTION__KEYS="check:$(head -c 32 /dev/urandom | base64)" \
    cargo run --quiet --locked --bin session-broker -- check-config "$work/broker.toml"
}
check_config base BROKER__STORE__URL="redis://redis:6379"
check_config overlays/redis-sentinel BROKER__STORE__PASSWORD="check"

# Debian's Chromium for the browser walk-through: prints its path, or fails when it is neither
# installed nor installable (not root, or no apt-get).
chromium_path() {
  if [ -x /usr/bin/chromium ]; then echo /usr/bin/chromium; return; fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing chromium from Debian's packages" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 || return 1
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null || return 1
    [ -x /usr/bin/chromium ] && echo /usr/bin/chromium && return
  fi
  return 1
}

say "session-broker dev for the client journeys and the browser walk-through"
cargo build --locked --bin session-broker
broker_bin="$PWD/target/debug/session-broker"

say "Python journey (grpcio; stubs generated from proto/) in a throwaway virtualenv"
python3 -m venv "$work/py-client-venv"
"$work/py-client-venv/bin/pip" install --quiet --disable-pip-version-check -r examples/python/requirements.txt
"$work/py-client-venv/bin/python" examples/python/journey.py --broker "$broker_bin"

say "Node journey (@grpc/grpc-js; npm ci from the committed lockfile)"
(cd examples/node && npm ci --no-audit --no-fund --loglevel=error && node journey.js --broker "$broker_bin")

say "browser walk-through: headless Chromium driven by playwright-core"
if chromium=$(chromium_path); then
  (cd tests/browser && npm ci --no-audit --no-fund --loglevel=error &&
    CHROMIUM="$chromium" node walkthrough.js --broker "$broker_bin")
else
  echo "SKIPPED: browser walk-through: Chromium is not installed and cannot be installed here (needs root and apt-get)"
fi

say "all checks passed"
