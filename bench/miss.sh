#!/usr/bin/env bash
# Miss-path overhead: what the gateway adds to a call that goes through to Chat.
#
# One connection, one request at a time (wrk -t1 -c1): get_list with
# `Cache-Control: no-cache` through the gateway (every request bypasses the cache
# and goes to the upstream, the project's Chat emulator, through the gateway's
# signer, rate limiter and client), against the same request sent straight to the
# emulator with Chat's query string (an admin UserSig from `chat-gateway usersig`).
# The two alternate (gateway, emulator, gateway, ...); the gateway and the emulator
# are pinned to SERVER_CPU (with one request in flight they never compete), wrk to
# CLIENT_CPU. The gateway's latency minus the emulator's is the miss path's cost:
# the gateway's own work plus one more loopback hop.
#
#   bench/miss.sh
#   ROUNDS=5 DURATION=20s bench/miss.sh
#
# Checks: before the rounds, the gateway answers the request with `x-cache:
# BYPASS` and ErrorCode 0, and so does the emulator directly; during each gateway
# round the emulator received one call per request wrk completed (at most one more,
# in flight when wrk stopped), so every request really went upstream; every answer
# the emulator gave was ErrorCode 0; any non-2xx answer aborts the run.
#
# Environment:
#   ROUNDS (3)          measured rounds per target
#   DURATION (10s)      wrk duration of one round
#   WARMUP (3s)         wrk warm-up per target before the rounds (not measured)
#   ACCOUNT (743)       account number whose first page is asked for (user_0743 of
#                       the 1000-account emulator world: a 1.2 KB answer)
#   LOG_LEVEL (warn)    the gateway's log.level
#   SERVER_CPU (0)      CPU the gateway and the emulator are pinned to
#   CLIENT_CPU (1)      CPU wrk is pinned to
#   NO_BUILD, KEEP_TMP, QUIET_PCT (5), QUIET_WAIT (300), ROUND_TRIES (5): as in bench/hit.sh
#
# Output: a table on stdout, also written to bench/out/miss-<date>.txt.
# Needs: wrk, curl, taskset (installed with apt-get when missing; nginx too, as
# the scripts share their set-up).
# shellcheck disable=SC2119 # ensure_tools and build take optional arguments
set -euo pipefail

SCRIPT=miss.sh
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-3s}
ACCOUNT=${ACCOUNT:-743}
LOG_LEVEL=${LOG_LEVEL:-warn}

ensure_tools
build
make_tmp miss

start_emulator 1000 "$SERVER_CPU"
ACCOUNT_WIDTH=4
write_gateway_config "[cache]
ttl_secs = 3600

[ratelimit]
per_command_per_sec = 1000000

[log]
format = \"text\"
level = \"$LOG_LEVEL\""
start_gateway "$SERVER_CPU"

BODY=$(body_of "$ACCOUNT")
# Before the rounds: both answer well, the gateway with BYPASS.
out=$(post "$GW$PATH_GET_LIST" "$BODY" "$TMP/headers" -H 'Cache-Control: no-cache') || die "gateway: request failed"
[[ "$(header "$TMP/headers" x-cache)" == BYPASS ]] || die "gateway: not a BYPASS: $(cat "$TMP/headers")"
grep -q '"ErrorCode" *: *0[,}]' <<<"$out" || die "gateway answered: $out"
GW_LEN=${#out}
out=$(post "$EMU$UPSTREAM_URI" "$BODY" "$TMP/headers") || die "emulator: request failed"
grep -q '"ErrorCode" *: *0[,}]' <<<"$out" || die "emulator answered: $out"
EMU_LEN=${#out}

lua() { # FILE EXTRA_HEADER_LINE
    cat >"$1" <<EOF
-- One get_list request, the same every time.
wrk.method = "POST"
wrk.body = '$BODY'
wrk.headers["Content-Type"] = "application/json"
$2
EOF
}
lua "$TMP/gateway.lua" 'wrk.headers["Cache-Control"] = "no-cache"'
lua "$TMP/emulator.lua" ''
declare -A URL=([gateway]="$GW$PATH_GET_LIST" [emulator]="$EMU$UPSTREAM_URI")

for s in gateway emulator; do
    log "warm-up: $s for $WARMUP"
    run_wrk "$s" "${URL[$s]}" "$WARMUP" "$TMP/warmup-$s.txt" "$TMP/$s.lua" -t1 -c1
done

count_calls_before() { c0=$(emulator_calls); }
us() { awk -v m="$1" 'BEGIN { printf "%.0f", m * 1000 }'; } # ms -> µs
curl -fsS -X POST "$EMU/__emulator/reset-stats" >/dev/null
ROWS=""
for ((r = 1; r <= ROUNDS; r++)); do
    for s in gateway emulator; do
        out="$TMP/round-$r-$s.txt"
        log "round $r/$ROUNDS: $s for $DURATION"
        BEFORE_TRY=count_calls_before
        measured_round "$s" "${URL[$s]}" "$DURATION" "$out" "$TMP/$s.lua" -t1 -c1
        c1=$(emulator_calls)
        n=$(requests_of "$out")
        # Every request reached the emulator (the last may have been in flight).
        calls=$((c1 - c0))
        ((calls >= n && calls <= n + 1)) || die "$s round $r: $n requests but $calls emulator calls"
        rps=$(rps_of "$out")
        p50=$(us "$(pct_of "$out" 50%)")
        p99=$(us "$(pct_of "$out" 99%)")
        echo "$rps" >>"$TMP/rps-$s"
        echo "$p50" >>"$TMP/p50-$s"
        echo "$p99" >>"$TMP/p99-$s"
        ROWS+=$(printf '%-5s  %-9s  %10s  %10s  %10s  %8s  %8s' "$r" "$s" "$rps" "$p50" "$p99" "$bg" "$other")$'\n'
    done
done
CODES=$(emulator_codes)
[[ "$CODES" =~ ^\{\"0\":[0-9]+\}$ ]] || die "the emulator answered other codes than 0 during the rounds: $CODES"

GW_RPS=$(median <"$TMP/rps-gateway")
EMU_RPS=$(median <"$TMP/rps-emulator")
GW_P50=$(median <"$TMP/p50-gateway")
EMU_P50=$(median <"$TMP/p50-emulator")
GW_P99=$(median <"$TMP/p99-gateway")
EMU_P99=$(median <"$TMP/p99-emulator")
diff_us() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%+.0f µs", a - b }'; }

OUT=$(out_file miss)
{
    report_head "bench/miss.sh: the miss path, chat-gateway (Cache-Control: no-cache) vs the emulator directly"
    # (wrk -v exits 1)
    printf '%s\n' "$(wrk -v 2>&1 | head -1 | awk '{print $1, $2}')"
    echo "wrk -t1 -c1 -d$DURATION --latency on CPU $CLIENT_CPU; gateway and emulator on CPU $SERVER_CPU;" \
        "$ROUNDS rounds each, alternating, after a $WARMUP warm-up"
    echo "request: get_list of user_$(printf %04d "$ACCOUNT")'s first page; answers: gateway $GW_LEN bytes, emulator $EMU_LEN bytes"
    echo "gateway: TOKIO_WORKER_THREADS=1, log $LOG_LEVEL, ratelimit.per_command_per_sec 1000000; emulator: --rate-limit 0"
    echo
    printf '%-5s  %-9s  %10s  %10s  %10s  %8s  %8s\n' round target "req/s" "p50 us" "p99 us" before during
    printf '%s' "$ROWS"
    QUIET_NOTE
    echo
    printf '%-9s  %10s  %10s  %10s\n' median "req/s" "p50 us" "p99 us"
    printf '%-9s  %10s  %10s  %10s\n' gateway "$GW_RPS" "$GW_P50" "$GW_P99"
    printf '%-9s  %10s  %10s  %10s\n' emulator "$EMU_RPS" "$EMU_P50" "$EMU_P99"
    echo
    echo "gateway - emulator: p50 $(diff_us "$GW_P50" "$EMU_P50"), p99 $(diff_us "$GW_P99" "$EMU_P99");" \
        "gateway / emulator: p50 x$(ratio "$GW_P50" "$EMU_P50"), p99 x$(ratio "$GW_P99" "$EMU_P99")"
    echo "checks: every gateway request reached the emulator (calls = requests, +1 in flight at most);" \
        "every emulator answer ErrorCode 0 ($CODES)"
} | tee "$OUT"
log "written to ${OUT#"$ROOT/"}"
