#!/usr/bin/env bash
# Fleet benchmarks: three gateway processes (release build) sharing one local
# redis-server in front of a fake Chat, as in tests/fleet.rs. Prints, and writes to
# bench/out/fleet-<date>.txt:
#   - Redis operations per admitted upstream call at saturation (rate limit, and
#     every operation by kind), 1500 distinct misses over 3 gateways at N = 200/s,
#     and the Redis round trips of a memory miss before Chat and after the answer;
#   - invalidation lag: an admin invalidation on gateway 1 until gateways 2 and 3
#     answer MISS (p50/p99 over 400 samples), and the gateways' lag histogram;
#   - these two (Redis operations per call, invalidation lag) again with the
#     gateways on a Redis Cluster of 3 masters (lines `BENCH cluster: ...`);
#   - what an L2 hit adds over an in-memory hit (request latency p50/p99);
#   - memory-hit throughput of a gateway with [redis] set against one without (wrk);
#   - a group event over 100,006 indexed accounts: time to apply it everywhere, and
#     the largest Redis command it ran (SLOWLOG).
#
#   bench/fleet.sh
#
# Needs: redis-server (scripts/test-deps.sh), wrk.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
command -v redis-server >/dev/null || bash scripts/test-deps.sh
command -v wrk >/dev/null || { echo "fleet.sh: wrk is needed (apt-get install wrk)" >&2; exit 1; }
mkdir -p bench/out
out="bench/out/fleet-$(date +%Y%m%d-%H%M%S).txt"
{
  echo "# bench/fleet.sh at $(git rev-parse --short HEAD) on $(nproc) CPUs"
  cargo test --release --test fleet_bench -- --ignored --nocapture --test-threads=1 2>&1 \
    | grep -E 'BENCH|test result|panicked' | sed 's/^.*BENCH/BENCH/'
} | tee "$out"
