#!/usr/bin/env bash
# Load test of the Chat emulator: `recentcontact/get_list` for rotating accounts,
# driven by wrk against a release build on loopback, faults and rate limit off.
#
#   bench/emulator.sh                 # 10 s, 2 threads, 64 connections
#   DURATION=30 CONNECTIONS=128 bench/emulator.sh
#
# Environment: PORT (19000), DURATION (10, seconds), THREADS (2), CONNECTIONS (64),
# ACCOUNTS (1000), MIN_RPS (20000: exit 1 below it; 0 to never fail).
set -euo pipefail

cd "$(dirname "$0")/.."

PORT=${PORT:-19000}
DURATION=${DURATION:-10}
THREADS=${THREADS:-2}
CONNECTIONS=${CONNECTIONS:-64}
ACCOUNTS=${ACCOUNTS:-1000}
MIN_RPS=${MIN_RPS:-20000}
ADDR="127.0.0.1:${PORT}"
BASE="http://${ADDR}"

need() {
    command -v "$1" >/dev/null 2>&1 && return 0
    echo "installing $2 ..." >&2
    apt-get install -y "$2" >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y "$2" >/dev/null; }
}
need wrk wrk
need curl curl

TMP=$(mktemp -d)
PID=""
cleanup() {
    if [[ -n "$PID" ]] && kill -0 "$PID" 2>/dev/null; then
        kill -TERM "$PID" 2>/dev/null || true
        wait "$PID" 2>/dev/null || true
    fi
    rm -rf "$TMP"
}
trap cleanup EXIT

healthy() {
    for _ in $(seq 1 100); do
        if curl -fsS "${BASE}/__emulator/health" >/dev/null 2>&1; then
            return 0
        fi
        if ! kill -0 "$PID" 2>/dev/null; then
            return 1
        fi
        sleep 0.1
    done
    return 1
}

echo "== building release (this takes a few minutes the first time)" >&2
cargo build --release --bin chat-gateway >&2

echo "== starting the emulator on ${ADDR}" >&2
target/release/chat-gateway emulator --listen "$ADDR" --accounts "$ACCOUNTS" --rate-limit 0 \
    >"$TMP/emulator.log" 2>&1 &
PID=$!
healthy || { echo "the emulator did not start:" >&2; cat "$TMP/emulator.log" >&2; exit 1; }
HOW="target/release/chat-gateway emulator --listen ${ADDR} --accounts ${ACCOUNTS} --rate-limit 0"

SIG=$(curl -fsS "${BASE}/__emulator/admin-usersig?format=text&expire=3600")
curl -fsS -X POST "${BASE}/__emulator/faults" \
    -d '{"rate_limit":0,"fail_50004":0,"fail_50005":0,"drop_rate":0,"latency_ms":0,"jitter_ms":0}' >/dev/null

WIDTH=$(( ${#ACCOUNTS} > 4 ? ${#ACCOUNTS} : 4 ))
cat >"$TMP/get_list.lua" <<EOF
-- get_list for rotating accounts user_0001 ... user_${ACCOUNTS}, fresh random per call.
local sig = "${SIG}"
local accounts = ${ACCOUNTS}
local n = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
init = function(args)
  math.randomseed(os.time() + math.floor(os.clock() * 1000000))
  n = math.random(0, accounts - 1)
end
request = function()
  n = (n + 1) % accounts
  local path = "/v4/recentcontact/get_list?sdkappid=1400000000&identifier=administrator&usersig="
    .. sig .. "&random=" .. math.random(0, 2147483647) .. "&contenttype=json"
  local body = string.format(
    '{"From_Account":"user_%0${WIDTH}d","TimeStamp":0,"StartIndex":0,"TopTimeStamp":0,"TopStartIndex":0,"AssistFlags":63}',
    n + 1)
  return wrk.format(nil, path, nil, body)
end
EOF

# A warm-up second, then zero the counters so the stats below cover the run only.
wrk -t "$THREADS" -c "$CONNECTIONS" -d 1s -s "$TMP/get_list.lua" "$BASE" >/dev/null
curl -fsS -X POST "${BASE}/__emulator/reset-stats" >/dev/null

echo "== wrk -t${THREADS} -c${CONNECTIONS} -d${DURATION}s (get_list, ${ACCOUNTS} accounts)" >&2
wrk -t "$THREADS" -c "$CONNECTIONS" -d "${DURATION}s" --latency -s "$TMP/get_list.lua" "$BASE" | tee "$TMP/wrk.out"

STATS=$(curl -fsS "${BASE}/__emulator/stats")
RPS=$(awk '/^Requests\/sec:/ {print $2}' "$TMP/wrk.out")
LAT=$(awk '/^    Latency/ {print $2, "avg,", $3, "stdev,", $4, "max"; exit}' "$TMP/wrk.out")
P99=$(awk '/^ +99%/ {print $2; exit}' "$TMP/wrk.out")
echo
echo "emulator:     ${HOW}"
echo "machine:      $(nproc) cores; wrk on the same machine"
echo "requests/s:   ${RPS}"
echo "latency:      ${LAT}; p99 ${P99}"
echo "answers:      $(printf '%s' "$STATS" | tr -d '\n' | sed -n 's/.*"answers_per_code":\({[^}]*}\).*/\1/p')"

if [[ "$MIN_RPS" != 0 ]] && awk -v r="$RPS" -v m="$MIN_RPS" 'BEGIN { exit !(r < m) }'; then
    echo "FAIL: ${RPS} requests/s is below ${MIN_RPS}" >&2
    exit 1
fi
echo "OK: at least ${MIN_RPS} requests/s"
