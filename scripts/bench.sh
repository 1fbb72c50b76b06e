#!/usr/bin/env bash
# Benchmarks the broker against the floor (examples/floor.rs: one gRPC call doing one Redis GET)
# on this machine, at 16 and 64 concurrent callers, and writes the table into docs/benchmarks.md.
#
#   scripts/bench.sh                       # ~6 minutes on 2 cores
#   BENCH_DURATION=5s BENCH_ROUNDS=1 scripts/bench.sh     # shorter
#
# Each concurrency runs ROUNDS (5) rounds. A round is one load generator run that takes turns
# of PHASE (500 ms) between the floor, GetCurrentAal, GetSession and GetPdsToken until each has
# had DURATION (6 s): on a shared machine the figures drift by more than the differences
# measured, and turns this short put every target through the same drift. Each round starts
# one further along that list. The table gives the median of the rounds, and each ratio is the
# median of the rounds' own ratios.
#
# Everything is private and on loopback: its own Redis on a free port, the CIS2 and APIM
# simulators (examples/sims.rs), the production binary (`session-broker serve`) with the Redis
# store, and a caller token made up for this run.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${BENCH_DURATION:-6s}
WARMUP=${BENCH_WARMUP:-2s}
PHASE=${BENCH_PHASE:-500ms}
CONCURRENCIES=${BENCH_CONCURRENCIES:-"16 64"}
ROUNDS=${BENCH_ROUNDS:-5}
MEMORY_SESSIONS=${BENCH_MEMORY_SESSIONS:-100000}
DOC=${BENCH_DOC:-docs/benchmarks.md}
CALLBACK="http://127.0.0.1:9/bench/callback"

say() { printf '\n== %s\n' "$*" >&2; }

command -v redis-server >/dev/null && command -v redis-benchmark >/dev/null || {
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-tools >/dev/null
  else
    echo "bench.sh needs redis-server and redis-benchmark" >&2; exit 1
  fi
}

# scripts/instructions.sh: the servers run under callgrind, which counts their instructions.
under=()
if [ -n "${BENCH_INSTRUCTIONS:-}" ]; then
  command -v valgrind >/dev/null || {
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null
    else
      echo "instructions.sh needs valgrind (Debian: apt-get install valgrind)" >&2; exit 1
    fi
  }
  under=(valgrind --tool=callgrind --callgrind-out-file=%q{CALLGRIND_OUT})
fi

say "building release"
[ -n "${BENCH_NO_BUILD:-}" ] || cargo build --release --locked --examples --bins
bin=target/release
loadgen=$bin/examples/loadgen

work=$(mktemp -d)
pids=()
cleanup() {
  local rc=$?
  if [ "$rc" != 0 ]; then
    for log in "$work"/*.log; do echo "--- $log" >&2; tail -n 20 "$log" >&2; done
  fi
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
wait_port() {
  # Up to 30 s: a server under callgrind starts slowly.
  for _ in $(seq 1 300); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return
    sleep 0.1
  done
  echo "nothing listens on port $1" >&2; exit 1
}

say "starting a private Redis"
redis_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no --dir "$work" \
  --logfile "$work/redis.log" &
pids+=($!)
wait_port "$redis_port"
redis="redis-cli -p $redis_port"
redis_url="redis://127.0.0.1:$redis_port"

say "starting the floor"
floor_port=$(free_port)
CALLGRIND_OUT="$work/callgrind-floor" "${under[@]}" \
  $bin/examples/floor --redis "$redis_url" --listen "127.0.0.1:$floor_port" >"$work/floor.log" 2>&1 &
floor_pid=$!
pids+=($floor_pid)
wait_port "$floor_port"

say "starting the CIS2 and APIM simulators"
$bin/session-broker keys generate --dir "$work" --kid bench-1 >/dev/null
python3 -c 'import secrets; print(secrets.token_urlsafe(24))' >"$work/client-secret"
python3 -c 'import secrets; print(secrets.token_urlsafe(24))' >"$work/apim-secret"
$bin/examples/sims --jwks "$work/bench-1.jwks.json" --callback "$CALLBACK" \
  --client-secret-file "$work/client-secret" --apim-secret-file "$work/apim-secret" \
  --out "$work/sims.env" >"$work/sims.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do [ -f "$work/sims.env" ] && break; sleep 0.1; done
# shellcheck disable=SC1091
. "$work/sims.env"

say "starting the broker (session-broker serve, Redis store)"
$bin/session-broker callers new-token >"$work/caller"
caller_token=$(awk '/^token:/ {print $2}' "$work/caller")
caller_hash=$(awk '/^token_sha256:/ {print $2}' "$work/caller")
grpc_port=$(free_port)
http_port=$(free_port)
cat >"$work/broker.toml" <<TOML
[server]
grpc_addr = "127.0.0.1:$grpc_port"
http_addr = "127.0.0.1:$http_port"

[store]
kind = "redis"
url = "$redis_url"
key_prefix = "sb-bench:"

[cis2]
issuer = "$CIS2_ISSUER"
discovery_url = "$CIS2_DISCOVERY_URL"
client_id = "$CIS2_CLIENT_ID"
client_auth = "client_secret_post"
redirect_uris = ["$CALLBACK"]

[apim]
pattern = "separate"
token_url = "$APIM_TOKEN_URL"
api_key = "$APIM_API_KEY"

[[signing.keys]]
kid = "bench-1"
private_key_file = "$work/bench-1.pem"

[[callers]]
name = "bench"
token_sha256 = "$caller_hash"
rpcs = ["*"]
# The benchmark measures the broker, not its rate limiter.
rate_per_second = 1000000
max_pending_logins_per_minute = 1000000
TOML
encryption_key=$(python3 -c 'import base64, secrets; print(base64.b64encode(secrets.token_bytes(32)).decode())')
BROKER__ENCRYPTION__KEYS="bench:$encryption_key" \
BROKER__CIS2__CLIENT_SECRET="$(cat "$work/client-secret")" \
BROKER__APIM__CLIENT_SECRET="$(cat "$work/apim-secret")" CALLGRIND_OUT="$work/callgrind-broker" \
  "${under[@]}" $bin/session-broker serve --config "$work/broker.toml" >"$work/broker.log" 2>&1 &
broker_pid=$!
pids+=($broker_pid)
wait_port "$grpc_port"

results="$work/results.txt"
session_keys() { $redis --scan --pattern 'sb-bench:s:{*}' | awk '/}$/ {n++} END {print n+0}'; }
: >"$results"
lg() {
  # lg NAME CONCURRENCY ADDR ARGS...: one load generator run, its RESULT line kept under NAME.
  local name=$1 conc=$2 addr=$3; shift 3
  say "$name at $conc callers"
  local line
  line=$(BROKER_TOKEN="$caller_token" $loadgen --addr "$addr" --concurrency "$conc" \
    --duration "$DURATION" --warmup "$WARMUP" --callback "$CALLBACK" "$@" | tee -a /dev/stderr | grep '^RESULT')
  echo "$name $conc $line" >>"$results"
}
# round CONCURRENCY N: one load generator run taking turns between the floor and the broker's hot
# RPCs; each RESULT line is kept under its target's name.
round() {
  local conc=$1 n=$2 targets=() args=()
  targets=("floor,http://127.0.0.1:$floor_port,$floor_pid" "get-current-aal,$broker,$broker_pid"
    "get-session,$broker,$broker_pid" "get-pds-token,$broker,$broker_pid")
  # Each round starts one further along the list, so no target always has the first turn.
  for i in "${!targets[@]}"; do
    args+=(--target "${targets[$(((i + n - 1) % ${#targets[@]}))]}")
  done
  say "round $n of $ROUNDS at $conc callers"
  BROKER_TOKEN="$caller_token" $loadgen --concurrency "$conc" --phase "$PHASE" \
    --duration "$((${DURATION%s} * ${#targets[@]}))s" --warmup "$WARMUP" --callback "$CALLBACK" \
    "${args[@]}" | tee -a /dev/stderr | grep '^RESULT' | while read -r line; do
    local rpc=${line#RESULT rpc=}; rpc=${rpc%% *}
    [ "$rpc" = Floor ] && rpc=floor
    echo "$rpc $conc $line" >>"$results"
  done
}
# BENCH_PERF=FILE: CPU profiles of the broker (perf from linux-perf), one run of each RPC on its
# own: FILE during GetCurrentAal and FILE.GetPdsToken during GetPdsToken, to set side by side.
profile() {
  local conc=$1 rpc lgpid out
  for rpc in get-current-aal get-pds-token; do
    out=$BENCH_PERF
    [ "$rpc" = get-current-aal ] || out="$BENCH_PERF.GetPdsToken"
    say "perf profile of $rpc at $conc callers into $out"
    BROKER_TOKEN="$caller_token" $loadgen --addr "$broker" --rpc "$rpc" --concurrency "$conc" \
      --duration 10s --warmup 3s --callback "$CALLBACK" >"$work/profile-$rpc.txt" 2>&1 &
    lgpid=$!
    # The measured window only, not the sign-ins before it.
    for _ in $(seq 1 200); do grep -q '^signed in' "$work/profile-$rpc.txt" && break; sleep 0.1; done
    sleep 3
    perf record -F "${BENCH_PERF_HZ:-999}" -p "$broker_pid" -o "$out" -- sleep 8 >/dev/null 2>&1
    wait "$lgpid"
    grep '^RESULT' "$work/profile-$rpc.txt" >&2
  done
}
redis_bench() {
  local conc=$1
  say "redis-benchmark GET -d 700 at $conc clients"
  local secs=${DURATION%s}
  local csv
  csv=$(redis-benchmark -p "$redis_port" -t get -d 700 -c "$conc" -n $((secs * 60000)) --csv \
    | tail -1)
  # "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
  echo "redis-benchmark $conc $csv" | tee -a /dev/stderr >>"$results"
}

broker="http://127.0.0.1:$grpc_port"

if [ -n "${BENCH_INSTRUCTIONS:-}" ]; then
  # Instructions per call: callgrind counts what the server executed between the start and the
  # end of the load generator's measured window, whatever else the machine runs meanwhile.
  instructions() {
    local name=$1 server=$2 pid=$3 addr=$4 rpc=$5 log="$work/instructions-$1.txt" lgpid
    BROKER_TOKEN="$caller_token" $loadgen --addr "$addr" --rpc "$rpc" --concurrency 4 --sessions 4 \
      --duration "${BENCH_INSTRUCTIONS_DURATION:-20s}" --warmup 5s --callback "$CALLBACK" \
      --announce >"$log" 2>&1 &
    lgpid=$!
    for _ in $(seq 1 1200); do grep -q '^measuring' "$log" && break; sleep 0.05; done
    callgrind_control -z "$pid" >/dev/null
    wait "$lgpid"
    callgrind_control -d "$name" "$pid" >/dev/null
    local calls total
    calls=$(awk '/^RESULT/ {for (i = 1; i <= NF; i++) if ($i ~ /^(ok|errors)=/) {sub(/^[a-z]+=/, "", $i); n += $i}} END {print n + 0}' "$log")
    # The dump's file names its trigger (`callgrind_control -d NAME`) and its total (`summary:`).
    total=$(awk -v want="$name" '/^desc: Trigger:/ {t = ($NF == want)} /^summary:/ && t {print $2}' \
      "$work/callgrind-$server".* | tail -1)
    per_call[$name]=$(python3 -c "print(round($total / max($calls, 1)))")
    printf '%-14s %8s calls %15s instructions %9s a call\n' "$name" "$calls" "$total" "${per_call[$name]}"
  }
  declare -A per_call
  say "instructions per call (callgrind; 4 callers)"
  instructions floor floor "$floor_pid" "http://127.0.0.1:$floor_port" floor
  instructions GetCurrentAal broker "$broker_pid" "$broker" get-current-aal
  instructions GetSession broker "$broker_pid" "$broker" get-session
  instructions GetPdsToken broker "$broker_pid" "$broker" get-pds-token
  python3 - "${per_call[floor]}" "${per_call[GetCurrentAal]}" "${per_call[GetSession]}" \
    "${per_call[GetPdsToken]}" <<'PY'
import sys
floor, aal, session, pds = map(int, sys.argv[1:])
print(f"÷ floor: GetCurrentAal {aal / floor:.2f}, GetSession {session / floor:.2f}, "
      f"GetPdsToken {pds / floor:.2f}; GetPdsToken ÷ GetCurrentAal {pds / aal:.2f}")
PY
  exit
fi

if [ -n "${SOAK_DURATION:-}" ]; then
  # scripts/soak.sh: mixed load for a long time; RSS, errors and percentiles per interval.
  say "soak: mixed load for $SOAK_DURATION at ${SOAK_CONCURRENCY:-32} callers"
  rss() { awk '/^VmRSS:/ {print $2}' "/proc/$broker_pid/status"; }
  rss_start=$(rss)
  BROKER_TOKEN="$caller_token" $loadgen --addr "$broker" --rpc mixed \
    --concurrency "${SOAK_CONCURRENCY:-32}" --duration "$SOAK_DURATION" --warmup 5s \
    --report-every "${SOAK_REPORT_EVERY:-60s}" --callback "$CALLBACK" --watch-pid "$broker_pid" \
    --renew-sessions | tee "$work/soak.txt"
  rss_end=$(rss)
  errors=$(awk '/^RESULT/ {for (i = 1; i <= NF; i++) if ($i ~ /^errors=/) {sub("errors=", "", $i); print $i}}' "$work/soak.txt")
  echo "broker RSS at start (after warm-up sign-ins): ${rss_start} KiB; at end: ${rss_end} KiB"
  echo "errors: ${errors:-unknown}"
  [ "${errors:-1}" = 0 ]
  exit
fi

for conc in $CONCURRENCIES; do
  for n in $(seq 1 "$ROUNDS"); do round "$conc" "$n"; done
  redis_bench "$conc"
done
if [ -n "${BENCH_PERF:-}" ]; then profile "${CONCURRENCIES##* }"; fi

say "sign-ins (StartLogin + simulator + ExchangeCode) and the Redis memory each costs"
used_before_logins=$($redis INFO memory | awk -F: '/^used_memory:/ {print $2+0}')
sessions_before_logins=$(session_keys)
lg sign-in 16 "$broker" --rpc login --sessions 1
used_after_logins=$($redis INFO memory | awk -F: '/^used_memory:/ {print $2+0}')
sessions_after_logins=$(session_keys)
hwm_kib=$(awk '/^VmHWM:/ {print $2}' "/proc/$broker_pid/status")

say "Redis memory per session ($MEMORY_SESSIONS sessions)"
# Real sessions, signed in through the simulator above, are copied (value and TTL) under new
# keys of the same length: creating 100,000 by signing in would take most of the run.
sample=$($redis --scan --pattern 'sb-bench:s:{*}' | awk '/}$/ && !found {print; found=1}')
[ -n "$sample" ] || { echo "no session found in Redis" >&2; exit 1; }
value_bytes=$($redis STRLEN "$sample")
usage_bytes=$($redis MEMORY USAGE "$sample")
used_before=$($redis INFO memory | awk -F: '/^used_memory:/ {print $2+0}')
prefix="${sample%%\{*}{"
id="${sample#*\{}"; id="${id%\}}"
copy='local v = redis.call("GET", KEYS[1])
local ttl = redis.call("PTTL", KEYS[1])
for i = tonumber(ARGV[3]), tonumber(ARGV[3]) + tonumber(ARGV[4]) - 1 do
  redis.call("SET", ARGV[1] .. string.format("%0" .. ARGV[2] .. "d", i) .. "}", v, "PX", ttl)
end
return 1'
batch=10000
for ((start = 0; start < MEMORY_SESSIONS; start += batch)); do
  $redis EVAL "$copy" 1 "$sample" "$prefix" "${#id}" "$start" "$batch" >/dev/null
done
used_after=$($redis INFO memory | awk -F: '/^used_memory:/ {print $2+0}')

say "writing $DOC"
machine="$(nproc) cores, $(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo), $(uname -sr)"
python3 - "$results" "$DOC" "$machine" "$hwm_kib" "$used_before" "$used_after" \
  "$MEMORY_SESSIONS" "$value_bytes" "$usage_bytes" "$DURATION" \
  "$used_before_logins" "$used_after_logins" "$sessions_before_logins" "$sessions_after_logins" \
  "$ROUNDS" "$PHASE" <<'PY'
import re, sys, datetime, statistics
(results, doc, machine, hwm, before, after, n, value_bytes, usage, duration,
 lbefore, lafter, sbefore, safter, rounds, phase) = sys.argv[1:]
runs = {}  # (name, concurrency) -> one dict per round, in order
for line in open(results):
    name, conc, rest = line.split(" ", 2)
    if name == "redis-benchmark":
        cols = [c.strip('"') for c in rest.strip().split('","')]
        run = dict(ops=float(cols[1]), p50=float(cols[4]), p99=float(cols[6]), errors=0)
    else:
        kv = dict(re.findall(r"(\w+)=(\S+)", rest))
        run = dict(ops=float(kv["ops_per_s"]), p50=int(kv["p50_us"]) / 1000,
                   p99=int(kv["p99_us"]) / 1000, errors=int(kv["errors"]),
                   cpu=float(kv["cpu_us_per_call"]) if "cpu_us_per_call" in kv else None)
    runs.setdefault((name, conc), []).append(run)
med = statistics.median
rows = {key: dict(ops=med(r["ops"] for r in rs), p50=med(r["p50"] for r in rs),
                  p99=med(r["p99"] for r in rs), errors=sum(r["errors"] for r in rs),
                  cpu=med(r["cpu"] for r in rs) if all(r.get("cpu") for r in rs) else None)
        for key, rs in runs.items()}

def ratio(name, base, c, field):
    """The median over rounds of name's figure divided by base's in the same round."""
    a, b = runs.get((name, c)), runs.get((base, c))
    if not a or not b or not all(x.get(field) and y.get(field) for x, y in zip(a, b)):
        return None
    return med(x[field] / y[field] for x, y in zip(a, b))
order = ["floor", "GetCurrentAal", "GetSession", "GetPdsToken", "redis-benchmark", "sign-in"]
label = {"floor": "floor (gRPC + 1 Redis GET)", "GetPdsToken": "GetPdsToken (cached)",
         "redis-benchmark": "redis-benchmark GET -d 700",
         "sign-in": "sign-in (StartLogin + simulator + ExchangeCode)"}
concs = sorted({c for _, c in rows}, key=int)
out = ["| callers | what | ops/s | p50 ms | p99 ms | errors | server CPU µs/call | ops/s ÷ floor "
       "| p99 ÷ floor | CPU ÷ floor |",
       "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
verdicts = []
for c in concs:
    floor = rows.get(("floor", c))
    for name in order:
        r = rows.get((name, c))
        if not r:
            continue
        ops_ratio = p99_ratio = cpu_ratio = ""
        if floor and name not in ("floor", "redis-benchmark", "sign-in"):
            ops_ratio = f"{ratio(name, 'floor', c, 'ops'):.2f}"
            p99_ratio = f"{ratio(name, 'floor', c, 'p99'):.2f}"
            cpu = ratio(name, "floor", c, "cpu")
            cpu_ratio = f"{cpu:.2f}" if cpu is not None else ""
        cpu_us = f"{r['cpu']:.1f}" if r.get("cpu") else ""
        out.append(f"| {c} | {label.get(name, name)} | {r['ops']:,.0f} | {r['p50']:.2f} | "
                   f"{r['p99']:.2f} | {r['errors']} | {cpu_us} | {ops_ratio} | {p99_ratio} | {cpu_ratio} |")
    if floor:
        for name in ("GetCurrentAal", "GetSession"):
            if rows.get((name, c)):
                ops, p99 = ratio(name, "floor", c, "ops"), ratio(name, "floor", c, "p99")
                ok = ops >= 0.8 and p99 <= 1.5
                verdicts.append(f"- {c} callers, {name} ≥ 0.8× floor ops/s and p99 ≤ 1.5× floor p99: "
                                f"**{'met' if ok else 'missed'}** ({ops:.2f}×, {p99:.2f}×)")
    pds = ratio("GetPdsToken", "GetCurrentAal", c, "ops")
    if pds is not None:
        verdicts.append(f"- {c} callers, GetPdsToken (cached) within 10% of GetCurrentAal ops/s: "
                        f"**{'met' if pds >= 0.9 else 'missed'}** ({pds:.2f}×)")
hwm_mib = int(hwm) / 1024
per_session = (int(after) - int(before)) / int(n)
signed_in = int(safter) - int(sbefore)
per_signin = (int(lafter) - int(lbefore)) / signed_in if signed_in > 0 else float("nan")
verdicts.append(f"- broker peak RSS ≤ 64 MiB: **{'met' if hwm_mib <= 64 else 'missed'}** ({hwm_mib:.1f} MiB)")
worst = max(per_session, per_signin)
verdicts.append(f"- Redis memory per session ≤ 2 KiB: **{'met' if worst <= 2048 else 'missed'}** "
                f"({per_session:,.0f} bytes per cloned session, {per_signin:,.0f} per real sign-in)")
block = "\n".join([
    "<!-- bench:begin (written by scripts/bench.sh; edit outside these markers) -->",
    f"Run of {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on **{machine}**; "
    f"load generator on the same machine; {rounds} rounds, each one run taking turns of {phase} "
    f"between the floor and the broker's RPCs until each had {duration}, after a warm-up; "
    f"medians (ratios: the median of each round's own ratio).",
    "",
    *out,
    "",
    f"- Broker peak RSS (VmHWM, whole run including sign-ins): **{hwm_mib:.1f} MiB**",
    f"- Redis memory per session: **{per_session:,.0f} bytes** (`used_memory` {int(before):,} → "
    f"{int(after):,} for {int(n):,} sessions; one sealed session value is {int(value_bytes):,} bytes, "
    f"`MEMORY USAGE` of its key {int(usage):,} bytes). The {int(n):,} are copies (value and TTL) of a "
    f"session signed in through the simulator, under keys of the same length: the session key alone.",
    f"- Redis memory per real sign-in, everything included (session, user and CIS2-sid index "
    f"entries, consumed pending sign-in): **{per_signin:,.0f} bytes** (`used_memory` "
    f"{int(lbefore):,} → {int(lafter):,} over the {signed_in:,} sessions the sign-in run created)",
    "",
    "Targets:",
    "",
    *verdicts,
    "<!-- bench:end -->",
])
text = open(doc).read() if __import__("os").path.exists(doc) else ""
pattern = re.compile(r"<!-- bench:begin.*?<!-- bench:end -->", re.S)
text = pattern.sub(lambda _: block, text) if pattern.search(text) else text + "\n" + block + "\n"
open(doc, "w").write(text)
print(block)
PY
