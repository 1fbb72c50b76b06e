#!/usr/bin/env bash
# Instructions per call (not in CI): the floor and the broker's hot RPCs run under callgrind on
# the same private setup as scripts/bench.sh, with 4 callers, and this prints how many
# instructions each call took. Unlike ops/s or CPU time, the count does not move with whatever
# else the machine runs, so it shows a change of a few percent that the benchmark's noise hides.
# About 3 minutes; installs valgrind from Debian's packages when absent (as root).
#
#   scripts/instructions.sh
#   BENCH_INSTRUCTIONS_DURATION=40s scripts/instructions.sh    # more calls counted
set -euo pipefail
BENCH_INSTRUCTIONS=1 exec "$(dirname "$0")/bench.sh"
