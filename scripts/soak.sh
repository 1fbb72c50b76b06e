#!/usr/bin/env bash
# Soak test (not in CI): mixed load on the broker (60% GetCurrentAal, 25% GetSession,
# 14% GetPdsToken, 1% whole sign-ins) for 10 minutes by default, on the same private setup as
# scripts/bench.sh. Prints latency percentiles, error counts and the broker's RSS per minute,
# and RSS at start and end; exits non-zero on any error.
#
#   scripts/soak.sh                   # 10 minutes
#   scripts/soak.sh --duration 30s    # smoke test (reports every 10 s)
set -euo pipefail
duration=10m
concurrency=32
every=""
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) duration=$2; shift 2 ;;
    --concurrency) concurrency=$2; shift 2 ;;
    --report-every) every=$2; shift 2 ;;
    *) echo "usage: $0 [--duration 10m] [--concurrency 32] [--report-every 60s]" >&2; exit 2 ;;
  esac
done
if [ -z "$every" ]; then
  case "$duration" in
    *s) every=10s ;;
    *) every=60s ;;
  esac
fi
SOAK_DURATION=$duration SOAK_CONCURRENCY=$concurrency SOAK_REPORT_EVERY=$every \
  exec "$(dirname "$0")/bench.sh"
