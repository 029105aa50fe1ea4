#!/usr/bin/env bash
# The workload benchmark: how many calls reach Chat per 1,000 reads with the
# gateway and without it, and whether any answer was stale.
#
#   bench/workload.sh
#   OPS=10000 bench/workload.sh              # shorter
#   GATEWAYS=1 bench/workload.sh             # one gateway, no Redis
#
# The world: the emulator with 100,000 accounts (5,000 groups). The workload
# (examples/workload.rs): accounts and groups picked Zipf(1.1); 60% portrait_get of
# 20 accounts, 15% get_list (first page), 10% get_group_info (one group), 10%
# get_joined_group_list, 5% writes (portrait_set, sendmsg, send_group_msg,
# modify_group_base_info), CONCURRENCY workers, each operation on one of the
# gateways picked at random. A portrait_get names the 20 accounts of one screen:
# the viewer is picked Zipf(1.1), its 20 accounts are 20 Zipf(1.1) picks from the
# viewer's seed (the same screen names the same accounts); the last round draws 20
# fresh picks per request instead ("independent"). Every read is checked against
# the emulator right after it is answered (when no write was in flight meanwhile):
# a difference is a stale answer. A read answered with an error (ErrorCode not 0)
# is counted by its code and not compared.
#
# Rounds (in this order, on one emulator whose state carries over):
#   1. the operations straight to the emulator (no gateway): Chat calls are the
#      emulator's own count of the read commands (one per read, by construction).
#      First, so that no write goes behind the gateways' back (a write that
#      bypasses them, with no webhook, is covered by the TTL only);
#   2. through the gateways (GATEWAYS, default 3 on one redis-server), caches cold:
#      Chat calls are the gateways' chat_gateway_upstream_calls_total of the four
#      read commands (the checks go straight to the emulator and are not counted);
#   3. as 2, continuing with the caches round 2 left (other operations, SEED + 1):
#      warm caches (not yet a steady state: see bench/workload_ideal.py --rounds 20);
#   4. everything invalidated (POST /admin/cache/invalidate {"All":true}), then as
#      2 with independent picks for portrait_get.
# The floor: bench/workload_ideal.py, an ideal cache on the same mix (no TTL, no
# eviction, only writes drop entries), printed beside the rounds.
# Default TTLs (portrait_get 60 s, get_group_info, get_joined_group_list and
# get_list 10 s).
#
# Environment: OPS (30000 per round), CONCURRENCY (4), ACCOUNTS (100000),
# GATEWAYS (3), SEED (1), NO_BUILD, KEEP_TMP.
# Output: a table on stdout, also written to bench/out/workload-<date>.txt.
# Needs: redis-server (scripts/test-deps.sh), curl, python3.
set -euo pipefail

SCRIPT=workload.sh
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

OPS=${OPS:-30000}
CONCURRENCY=${CONCURRENCY:-4}
ACCOUNTS=${ACCOUNTS:-100000}
GATEWAYS=${GATEWAYS:-3}
SEED=${SEED:-1}
command -v redis-server >/dev/null || bash scripts/test-deps.sh
command -v python3 >/dev/null || die "python3 is needed"

if [[ -z "${NO_BUILD:-}" ]]; then
    log "cargo build --release --bin chat-gateway --example workload"
    cargo build --release --bin chat-gateway --example workload >&2
fi
WORKLOAD="$ROOT/target/release/examples/workload"
[[ -x "$BIN" && -x "$WORKLOAD" ]] || die "build first (or unset NO_BUILD)"
make_tmp workload

# The emulator: both CPUs (it answers the gateways' misses and every check).
free_port EMU_PORT
EMU="http://127.0.0.1:$EMU_PORT"
log "starting the emulator on $EMU ($ACCOUNTS accounts)"
"$BIN" emulator --listen "127.0.0.1:$EMU_PORT" --accounts "$ACCOUNTS" --rate-limit 0 \
    >"$TMP/emulator.log" 2>&1 &
EMU_PID=$!
PIDS+=("$EMU_PID")
wait_for emulator "$EMU_PID" 300 curl -fsS --max-time 1 "$EMU/__emulator/health"

REDIS_SECTION=""
if ((GATEWAYS > 1)); then
    free_port REDIS_PORT
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
        --dir "$TMP" --loglevel warning >"$TMP/redis.log" 2>&1 &
    PIDS+=("$!")
    wait_for redis "$!" 30 redis-cli -p "$REDIS_PORT" ping
    REDIS_SECTION=$'[redis]\n'"url = \"redis://127.0.0.1:$REDIS_PORT/0\""$'\n'"expected_gateways = $GATEWAYS"
fi

GWS=()
for i in $(seq "$GATEWAYS"); do
    free_port port
    cat >"$TMP/gateway-$i.toml" <<EOF
[server]
listen = "127.0.0.1:$port"

[chat]
sdkappid = 1400000000
identifier = "administrator"
secret_key = "emulator-secret-key"
region = "singapore"
base_url = "$EMU"

[ratelimit]
per_command_per_sec = 100000

[log]
level = "warn"

$REDIS_SECTION
EOF
    "$BIN" check-config --config "$TMP/gateway-$i.toml" >/dev/null 2>"$TMP/check-config.log" \
        || die "gateway config invalid: $(cat "$TMP/check-config.log")"
    "$BIN" --config "$TMP/gateway-$i.toml" >"$TMP/gateway-$i.log" 2>&1 &
    PIDS+=("$!")
    wait_for "gateway $i" "$!" 30 curl -fsS --max-time 1 "http://127.0.0.1:$port/readyz"
    GWS+=("http://127.0.0.1:$port")
done
TARGETS=$(IFS=,; echo "${GWS[*]}")
USERSIG=$("$BIN" usersig --config "$TMP/gateway-1.toml")

READS_RE='command="(profile/portrait_get|recentcontact/get_list|group_open_http_svc/get_group_info|group_open_http_svc/get_joined_group_list)"'
gateway_read_calls() { # the gateways' calls to Chat for the read commands, summed
    local total=0 g n
    for g in "${GWS[@]}"; do
        n=$(curl -fsS --max-time 5 "$g/metrics" | grep '^chat_gateway_upstream_calls_total' \
            | grep -E "$READS_RE" | awk '{s += $2} END {printf "%.0f", s}')
        total=$((total + n))
    done
    echo "$total"
}
emulator_read_calls() { # the emulator's count of the read commands
    curl -fsS --max-time 5 "$EMU/__emulator/stats" | python3 -c '
import json, sys
c = json.load(sys.stdin)["calls_per_command"]
print(sum(v for k, v in c.items() if k in ("profile/portrait_get", "recentcontact/get_list",
      "group_open_http_svc/get_group_info", "group_open_http_svc/get_joined_group_list")))'
}
field() { python3 -c 'import json, sys; v = json.load(open(sys.argv[1])); print(eval(sys.argv[2], {}, {"v": v}))' "$@"; }

run() { # NAME ARGS... -> $TMP/NAME.json
    local name=$1
    shift
    log "round $name: $OPS operations, $CONCURRENCY workers"
    "$WORKLOAD" --emulator "$EMU" --usersig "$USERSIG" --accounts "$ACCOUNTS" --ops "$OPS" \
        --concurrency "$CONCURRENCY" --seed "$SEED" "$@" >"$TMP/$name.json" 2>"$TMP/$name.err" \
        || die "workload $name failed: $(cat "$TMP/$name.err")"
    log "  $(cat "$TMP/$name.json" | head -c 400)"
}

# The gateways' calls to Chat per read command, summed over the gateways, before
# and after each gateway round ($TMP/calls-NAME-{0,1}.txt: "command count" lines).
calls_snapshot() {
    local g
    for g in "${GWS[@]}"; do
        curl -fsS --max-time 5 "$g/metrics" | grep '^chat_gateway_upstream_calls_total' \
            | grep -E "$READS_RE" | sed -E 's/.*command="([^"]+)".* ([0-9.e+]+)$/\1 \2/'
    done | awk '{s[$1] += $2} END {for (c in s) printf "%s %.0f\n", c, s[c]}' | sort >"$1"
}
calls_per_command() { # BEFORE AFTER -> "command: n, ..." (the round's calls)
    join -a2 -e 0 -o 0,1.2,2.2 "$1" "$2" \
        | awk '{printf "%s%s %d", sep, $1, $3 - $2; sep = ", "}'
}

e0=$(emulator_read_calls)
run direct --direct
e1=$(emulator_read_calls)
calls_snapshot "$TMP/calls-gateway-0.txt"
c0=$(gateway_read_calls)
run gateway --targets "$TARGETS"
c1=$(gateway_read_calls)
calls_snapshot "$TMP/calls-gateway-1.txt"
run warm --targets "$TARGETS" --seed "$((SEED + 1))"
c2=$(gateway_read_calls)
calls_snapshot "$TMP/calls-warm-1.txt"
log "invalidating everything before the independent round"
curl -fsS --max-time 10 -X POST -d '{"All":true}' "${GWS[0]}/admin/cache/invalidate" >/dev/null \
    || die "POST /admin/cache/invalidate failed"
c3=$(gateway_read_calls)
run independent --targets "$TARGETS" --portraits independent
c4=$(gateway_read_calls)

# The floor: an ideal cache on the same mix (bench/workload_ideal.py).
NGROUPS=$(curl -fsS --max-time 5 "$EMU/__emulator/world" | python3 -c 'import json, sys; print(json.load(sys.stdin)["groups"])')
log "an ideal cache on the same mix ($NGROUPS groups)"
IDEAL=$(python3 "$ROOT/bench/workload_ideal.py" --ops "$OPS" --accounts "$ACCOUNTS" --groups "$NGROUPS" --seed "$SEED")
IDEAL_IND=$(python3 "$ROOT/bench/workload_ideal.py" --ops "$OPS" --accounts "$ACCOUNTS" --groups "$NGROUPS" --seed "$SEED" --rounds 1 --portraits independent)
ideal_per() { sed -n "$1p" <<<"$2" | sed -E 's/.* ([0-9.]+) per 1,000 reads/\1/'; }

row() { # NAME JSON CALLS
    local reads per
    reads=$(field "$2" 'v["reads"]')
    per=$(awk -v c="$3" -v r="$reads" 'BEGIN { printf "%.1f", 1000 * c / r }')
    printf '%-34s %8s %10s %12s %8s %10s %10s %9s\n' "$1" "$reads" "$3" "$per" \
        "$(field "$2" 'v["stale"]')" "$(field "$2" 'v["checked"]')" \
        "$(field "$2" 'v["x_cache"].get("HIT", 0)')" "$(field "$2" 'v["from_l2"]')"
}
OUT=$(out_file workload)
{
    report_head "bench/workload.sh: Chat calls per 1,000 reads, with and without the gateway"
    echo "world: $ACCOUNTS accounts (emulator), picked Zipf(1.1); $OPS operations per round," \
        "$CONCURRENCY workers; $GATEWAYS gateway(s)$( ((GATEWAYS > 1)) && echo " on one redis-server (L2 on)")"
    echo "mix: 60% portrait_get x20, 15% get_list, 10% get_group_info, 10% get_joined_group_list, 5% writes"
    echo
    printf '%-34s %8s %10s %12s %8s %10s %10s %9s\n' round reads "Chat calls" "per 1k reads" stale checked "HIT" "from L2"
    row "no gateway (straight to Chat)" "$TMP/direct.json" "$((e1 - e0))"
    row "gateway, cold caches" "$TMP/gateway.json" "$((c1 - c0))"
    row "gateway, warm (after the cold round)" "$TMP/warm.json" "$((c2 - c1))"
    row "gateway, independent picks, cold" "$TMP/independent.json" "$((c4 - c3))"
    echo
    gw_per=$(awk -v c="$((c1 - c0))" -v r="$(field "$TMP/gateway.json" 'v["reads"]')" 'BEGIN { print 1000 * c / r }')
    d_per=$(awk -v c="$((e1 - e0))" -v r="$(field "$TMP/direct.json" 'v["reads"]')" 'BEGIN { print 1000 * c / r }')
    warm_per=$(awk -v c="$((c2 - c1))" -v r="$(field "$TMP/warm.json" 'v["reads"]')" 'BEGIN { print 1000 * c / r }')
    echo "Chat calls per 1,000 reads: without the gateway / with it = x$(ratio "$d_per" "$gw_per") (cold), x$(ratio "$d_per" "$warm_per") (warm)"
    echo "an ideal cache (one for the fleet, no TTL, no eviction, dropped only by writes; bench/workload_ideal.py):" \
        "$(ideal_per 1 "$IDEAL") (cold), $(ideal_per 2 "$IDEAL") (warm), $(ideal_per 1 "$IDEAL_IND") (independent) calls per 1,000 reads," \
        "x$(ratio 1000 "$(ideal_per 1 "$IDEAL")") / x$(ratio 1000 "$(ideal_per 2 "$IDEAL")") fewer than without a cache"
    echo "Chat calls per command: cold $(calls_per_command "$TMP/calls-gateway-0.txt" "$TMP/calls-gateway-1.txt"); warm $(calls_per_command "$TMP/calls-gateway-1.txt" "$TMP/calls-warm-1.txt")"
    echo "reads per command (gateway round): $(field "$TMP/gateway.json" 'v["reads_per_command"]')"
    echo "x-cache: cold $(field "$TMP/gateway.json" 'v["x_cache"]'); warm $(field "$TMP/warm.json" 'v["x_cache"]'); independent $(field "$TMP/independent.json" 'v["x_cache"]')"
    echo "operations/s: direct $(field "$TMP/direct.json" 'round(v["ops_per_sec"])'), cold $(field "$TMP/gateway.json" 'round(v["ops_per_sec"])'), warm $(field "$TMP/warm.json" 'round(v["ops_per_sec"])'), independent $(field "$TMP/independent.json" 'round(v["ops_per_sec"])') (each read of a gateway round also checked against the emulator)"
    echo "error answers by ErrorCode (not compared): direct $(field "$TMP/direct.json" 'v["error_answers"]'), cold $(field "$TMP/gateway.json" 'v["error_answers"]'), warm $(field "$TMP/warm.json" 'v["error_answers"]'), independent $(field "$TMP/independent.json" 'v["error_answers"]')"
    for n in gateway warm independent; do
        if [[ "$(field "$TMP/$n.json" 'v["stale"]')" != 0 ]]; then
            echo "STALE ($n): $(field "$TMP/$n.json" 'v["stale_examples"]')"
        fi
    done
} | tee "$OUT"
log "written to ${OUT#"$ROOT/"}"
