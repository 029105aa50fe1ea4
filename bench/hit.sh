#!/usr/bin/env bash
# Cache-hit load benchmark: chat-gateway's page cache vs nginx proxy_cache.
#
# Both cache the same get_list POSTs in front of the same upstream, the project's
# Chat emulator, and are driven by the same wrk script once every body is cached,
# so every measured request is a cache hit. The two servers alternate (gateway,
# nginx, gateway, nginx, ...) so drift on the machine hits both alike. Each server
# is pinned to one CPU, wrk to another.
#
#   bench/hit.sh                                   # MODE=hit: 100 pages, round robin
#   ROUNDS=5 DURATION=20s bench/hit.sh
#   MODE=working-set bench/hit.sh                  # K=100000 accounts, uniform random
#   MODE=working-set K=20000 DURATION=5s bench/hit.sh
#   MODE=instructions bench/hit.sh                 # = bench/instructions.sh
#
# Modes:
#   hit (default)   100 distinct bodies (user_0001 ... user_0100 of a 1000-account
#                   emulator) cached, requested round robin.
#   working-set     K distinct accounts (an emulator with K accounts) all cached,
#                   each request for a uniform random one: the cost of a hit when
#                   the cache is far larger than the CPU's caches. Filled by wrk
#                   (FILL_CONNECTIONS connections, one per wrk thread), then
#                   checked: the emulator answered exactly K calls per server, all
#                   ErrorCode 0; a second pass over all K accounts makes no
#                   upstream call; the gateway holds K pages
#                   (chat_gateway_cache_pages) and nginx K cache files. The gateway
#                   gets cache.max_bytes 8 GiB and ratelimit.per_command_per_sec
#                   1000000; nginx a keys_zone and max_size large enough, and
#                   open_file_cache for every cached file (NGX_OPEN_FILES).
#   instructions    callgrind instruction counts per hit: see bench/instructions.sh.
#
# In both load modes, after the rounds: the emulator received no call during them,
# and sampled bodies (SAMPLE random accounts in working-set) are still HITs on both
# servers. Any non-2xx answer under load aborts the run.
#
# Environment:
#   MODE (hit)          hit, working-set or instructions
#   K (100000)          working-set: accounts cached (at most 200000, the emulator's cap)
#   FILL_CONNECTIONS (8) working-set: wrk threads/connections filling each cache
#   SAMPLE (200)        working-set: random accounts checked for HITs after the rounds
#   NGX_OPEN_FILES      working-set: nginx open_file_cache size (K + 1000, capped
#                       below the open-files hard limit, `ulimit -Hn`)
#   FILL_TIMEOUT (300)  working-set: seconds one fill pass may take
#   ROUNDS (3)          measured rounds per server
#   DURATION (10s)      wrk duration of one round
#   WARMUP (3s)         wrk warm-up per server before the rounds (not measured)
#   CONNECTIONS (64)    wrk connections (one wrk thread)
#   SERVER_CPU (0)      CPU the gateway and nginx are pinned to
#   CLIENT_CPU (1)      CPU wrk (and the idle emulator) are pinned to
#   NO_BUILD (unset)    set to 1 to skip `cargo build --release`
#   KEEP_TMP (unset)    set to 1 to keep the temp dir (configs, logs)
#   NGINX_TMPL          nginx config template (bench/nginx/nginx.conf.tmpl)
#   QUIET_PCT (5)       before each round, wait until other work keeps the CPUs
#                       at most this % busy (sampled over 1 s, servers idle) ...
#   QUIET_WAIT (300)    ... for at most this many seconds, then run it anyway;
#                       and repeat a round in which other work took more than
#                       QUIET_PCT of the CPUs ...
#   ROUND_TRIES (5)     ... up to this many times (then keep the last, flagged)
#
# Output: a table on stdout, also written to bench/out/hit-<date>.txt
# (working-set-<date>.txt in that mode).
# Needs: wrk, nginx, curl, taskset (installed with apt-get when missing).
# shellcheck disable=SC2119 # ensure_tools and build take optional arguments
set -euo pipefail

SCRIPT=hit.sh
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

MODE=${MODE:-hit}
case "$MODE" in
    hit | working-set) ;;
    instructions) exec bash "$ROOT/bench/instructions.sh" ;;
    *) printf '[hit.sh] error: MODE=%s: not one of hit, working-set, instructions\n' "$MODE" >&2; exit 2 ;;
esac

# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-3s}
CONNECTIONS=${CONNECTIONS:-64}

if [[ "$MODE" == hit ]]; then
    BODIES=100
    EMU_ACCOUNTS=1000
    GW_EXTRA=$'[cache]\nttl_secs = 3600'
    GW_DESC="cache.ttl_secs 3600"
    NGX_SIZES=(10m 64m 1000)
else
    K=${K:-100000}
    if ! [[ "$K" =~ ^[0-9]+$ ]] || ((K < 1 || K > 200000)); then die "K=$K: must be 1 to 200000"; fi
    BODIES=$K
    EMU_ACCOUNTS=$K
    FILL_CONNECTIONS=${FILL_CONNECTIONS:-8}
    ((FILL_CONNECTIONS >= 1 && FILL_CONNECTIONS <= K)) || die "FILL_CONNECTIONS=$FILL_CONNECTIONS: must be 1 to K"
    SAMPLE=${SAMPLE:-200}
    # nginx keeps about 8000 keys per MB of keys_zone; files are a page plus ~600
    # bytes of header and key each. open_file_cache holds a descriptor per cached
    # file, all K when the open-files limit allows (nginx can raise its soft limit
    # up to the hard one, not beyond without CAP_SYS_RESOURCE); past it nginx
    # opens and closes the other files per request.
    NOFILE_HARD=$(ulimit -Hn)
    [[ "$NOFILE_HARD" == unlimited ]] && NOFILE_HARD=1048576
    NGX_OPEN_FILES=${NGX_OPEN_FILES:-$((K + 1000))}
    if ((NGX_OPEN_FILES > NOFILE_HARD - 2048)); then
        NGX_OPEN_FILES=$((NOFILE_HARD - 2048))
        log "warning: nginx's open_file_cache capped at $NGX_OPEN_FILES descriptors by the open-files limit ($NOFILE_HARD) for $K files"
        NGX_CAPPED=" (capped by the open-files hard limit $NOFILE_HARD: nginx opens the other cache files per request)"
    fi
    NGX_SIZES=("$((K / 4000 + 16))m" 16g "$NGX_OPEN_FILES")
    GW_EXTRA=$'[cache]\nttl_secs = 3600\nmax_bytes = 8589934592\n\n[ratelimit]\nper_command_per_sec = 1000000'
    GW_DESC="cache.ttl_secs 3600, cache.max_bytes 8 GiB, ratelimit.per_command_per_sec 1000000"
fi
ACCOUNT_WIDTH=$(account_width "$EMU_ACCOUNTS")

# ---------------------------------------------------------------- set-up
ensure_tools
build
make_tmp "$MODE"

# The emulator: the shared upstream, on the client's CPU (idle during the rounds).
start_emulator "$EMU_ACCOUNTS" "$CLIENT_CPU"
# The gateway's config: the emulator as upstream, a TTL far beyond the run.
write_gateway_config "$GW_EXTRA
[log]
format = \"text\"
level = \"warn\""
start_gateway "$SERVER_CPU"
render_nginx "${NGX_SIZES[@]}"
start_nginx "$SERVER_CPU" 'daemon off;'

# ---------------------------------------------------------------- fill the caches
GW_BYTES=0 NGX_BYTES=0 CHECKED=0
# check_hit N: body N is a HIT with a good answer on both servers; adds up sizes.
check_hit() {
    local out hdr="$TMP/headers"
    out=$(post "$GW$PATH_GET_LIST" "$(body_of "$1")" "$hdr") || die "gateway: body $1 failed"
    [[ "$(header "$hdr" x-cache)" == HIT ]] || die "gateway: body $1 not a HIT: $(cat "$hdr")"
    grep -q '"ErrorCode" *: *0[,}]' <<<"$out" || die "gateway: body $1 answered: $out"
    GW_BYTES=$((GW_BYTES + ${#out}))
    out=$(post "$NGX$PATH_GET_LIST" "$(body_of "$1")" "$hdr") || die "nginx: body $1 failed"
    [[ "$(header "$hdr" x-cache-status)" == HIT ]] || die "nginx: body $1 not a HIT: $(cat "$hdr")"
    grep -q '"ErrorCode" *: *0[,}]' <<<"$out" || die "nginx: body $1 answered: $out"
    NGX_BYTES=$((NGX_BYTES + ${#out}))
    CHECKED=$((CHECKED + 1))
}

if [[ "$MODE" == hit ]]; then
    # pass 1 fills both caches; pass 2 checks every body is a hit with a good answer.
    log "warming both caches with $BODIES bodies"
    for ((i = 1; i <= BODIES; i++)); do
        post "$GW$PATH_GET_LIST" "$(body_of "$i")" "$TMP/headers" >/dev/null || die "gateway: body $i failed"
        post "$NGX$PATH_GET_LIST" "$(body_of "$i")" "$TMP/headers" >/dev/null || die "nginx: body $i failed"
    done
    for ((i = 1; i <= BODIES; i++)); do check_hit "$i"; done
else
    # Each wrk thread has one connection and walks its share of the accounts once
    # (thread t of T: t+1, t+1+T, ...), then stops; answers are counted in order.
    FILL_LUA="$TMP/fill.lua"
    cat >"$FILL_LUA" <<EOF
-- Requests every account 1..$K once over all threads, then stops each thread.
local K, T = $K, $FILL_CONNECTIONS
local threads = {}
local counter = 0
setup = function(thread)
  thread:set("tid", counter)
  counter = counter + 1
  table.insert(threads, thread)
end
local nxt, mine = 0, 0
-- globals, so done() can read them with thread:get()
answered, bad = 0, 0
init = function(args)
  marks = args[1]
  nxt = tid + 1
  mine = math.floor((K - tid - 1) / T) + 1
end
request = function()
  local i = nxt
  if i > K then i = 1 else nxt = nxt + T end
  local body = string.format('{"From_Account":"user_%0${ACCOUNT_WIDTH}d","TimeStamp":0,"StartIndex":0,"TopTimeStamp":0,"TopStartIndex":0,"AssistFlags":63}', i)
  return wrk.format("POST", "$PATH_GET_LIST", {["Content-Type"] = "application/json"}, body)
end
response = function(status, headers, body)
  answered = answered + 1
  if status ~= 200 then bad = bad + 1 end
  if answered == mine then
    -- wrk itself runs to -d whatever its threads do: tell the script, which then
    -- interrupts it (SIGINT: wrk prints its summary and calls done()).
    local f = io.open(marks .. "/" .. tid, "w")
    if f then f:close() end
    wrk.thread:stop()
  end
end
done = function(summary, latency, requests)
  local a, b = 0, 0
  for _, t in ipairs(threads) do a = a + t:get("answered"); b = b + t:get("bad") end
  io.write(string.format("fill: answered %d, not 200: %d\n", a, b))
end
EOF
    # fill NAME URL: one pass over all K accounts; checks every answer was a 200.
    fill() {
        local out="$TMP/fill-$1-$2.txt" marks="$TMP/fill-$1-$2.marks" got rc=0 start
        start=$(date +%s.%N)
        mkdir -p "$marks"
        taskset -c "$CLIENT_CPU" wrk -t"$FILL_CONNECTIONS" -c"$FILL_CONNECTIONS" -d"${FILL_TIMEOUT:-300}s" \
            -s "$FILL_LUA" "$3" -- "$marks" >"$out" 2>&1 &
        WRK_PID=$!
        while (($(find "$marks" -type f | wc -l) < FILL_CONNECTIONS)) && kill -0 "$WRK_PID" 2>/dev/null; do
            sleep 0.2
        done
        kill -INT "$WRK_PID" 2>/dev/null || true
        wait "$WRK_PID" || rc=$?
        WRK_PID=""
        ((rc == 0)) || die "wrk (fill) failed against $1 (exit $rc): $(cat "$out")"
        FILL_SECS=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
        got=$(sed -n 's/^fill: answered \([0-9]*\), not 200: \([0-9]*\)$/\1 \2/p' "$out")
        [[ -n "$got" ]] || die "$1: fill pass did not finish: $(cat "$out")"
        read -r a b <<<"$got"
        ((a >= K && b == 0)) || die "$1: fill pass answered $a of $K, $b not 200 (see $out)"
    }
    curl -fsS -X POST "$EMU/__emulator/reset-stats" >/dev/null
    FILL_TIMES=""
    for s in gateway nginx; do
        url=$GW; [[ $s == nginx ]] && url=$NGX
        log "filling $s with $K accounts ($FILL_CONNECTIONS connections)"
        fill "$s" 1 "$url"
        FILL_TIMES+="${FILL_TIMES:+, }$s ${FILL_SECS} s"
    done
    calls=$(emulator_calls)
    codes=$(emulator_codes)
    ((calls == 2 * K)) || die "the emulator answered $calls calls while filling, not $((2 * K))"
    [[ "$codes" == "{\"0\":$((2 * K))}" ]] || die "the emulator's answers while filling: $codes"
    log "checking: a second pass over all $K accounts makes no upstream call"
    for s in gateway nginx; do
        url=$GW; [[ $s == nginx ]] && url=$NGX
        fill "$s" 2 "$url"
    done
    calls2=$(emulator_calls)
    ((calls2 == calls)) || die "the second pass made $((calls2 - calls)) upstream calls: not everything was cached"
    pages_check() {
        local gp nf
        gp=$(gateway_metric chat_gateway_cache_pages)
        nf=$(find "$TMP/nginx/cache" -type f | wc -l)
        [[ "$gp" == "$K" ]] || die "the gateway holds $gp pages, not $K"
        ((nf == K)) || die "nginx holds $nf cache files, not $K"
    }
    pages_check
    for ((i = 0; i < 20; i++)); do check_hit $((1 + (RANDOM * 32768 + RANDOM) % K)); done
fi
AVG_GW=$((GW_BYTES / CHECKED))
AVG_NGX=$((NGX_BYTES / CHECKED))

# ---------------------------------------------------------------- load
LUA="$TMP/hit.lua"
if [[ "$MODE" == hit ]]; then
    cat >"$LUA" <<EOF
-- $BODIES distinct get_list bodies, round robin; requests built once, in init(),
-- which wrk calls after setting the Host header (nginx answers 400 without it).
local reqs = {}
local n = 0
init = function(args)
  for i = 1, $BODIES do
    local body = string.format('{"From_Account":"user_%0${ACCOUNT_WIDTH}d","TimeStamp":0,"StartIndex":0,"TopTimeStamp":0,"TopStartIndex":0,"AssistFlags":63}', i)
    reqs[i] = wrk.format("POST", "$PATH_GET_LIST", {["Content-Type"] = "application/json"}, body)
  end
end
request = function()
  n = n % $BODIES + 1
  return reqs[n]
end
EOF
else
    cat >"$LUA" <<EOF
-- $BODIES distinct get_list bodies, a uniform random one per request; requests
-- built once, in init() (after wrk has set the Host header).
local reqs = {}
init = function(args)
  for i = 1, $BODIES do
    local body = string.format('{"From_Account":"user_%0${ACCOUNT_WIDTH}d","TimeStamp":0,"StartIndex":0,"TopTimeStamp":0,"TopStartIndex":0,"AssistFlags":63}', i)
    reqs[i] = wrk.format("POST", "$PATH_GET_LIST", {["Content-Type"] = "application/json"}, body)
  end
  math.randomseed(os.time())
end
request = function()
  return reqs[math.random(1, $BODIES)]
end
EOF
fi

declare -A URL=([gateway]="$GW" [nginx]="$NGX")
for s in gateway nginx; do
    log "warm-up: $s for $WARMUP"
    run_wrk "$s" "${URL[$s]}" "$WARMUP" "$TMP/warmup-$s.txt" "$LUA" -t1 -c"$CONNECTIONS"
done

CALLS_BEFORE=$(emulator_calls)
ROWS=""
for ((r = 1; r <= ROUNDS; r++)); do
    for s in gateway nginx; do
        out="$TMP/round-$r-$s.txt"
        log "round $r/$ROUNDS: $s for $DURATION"
        measured_round "$s" "${URL[$s]}" "$DURATION" "$out" "$LUA" -t1 -c"$CONNECTIONS"
        rps=$(rps_of "$out")
        p50=$(pct_of "$out" 50%)
        p99=$(pct_of "$out" 99%)
        echo "$rps" >>"$TMP/rps-$s"
        echo "$p99" >>"$TMP/p99-$s"
        echo "$p50" >>"$TMP/p50-$s"
        ROWS+=$(printf '%-5s  %-8s  %12s  %10s  %10s  %8s  %8s' "$r" "$s" "$rps" "$p50" "$p99" "$bg" "$other")$'\n'
    done
done
CALLS_AFTER=$(emulator_calls)

# Still all hits after the load?
if [[ "$MODE" == hit ]]; then
    hdr="$TMP/headers"
    post "$GW$PATH_GET_LIST" "$(body_of 1)" "$hdr" >/dev/null
    GW_AFTER=$(header "$hdr" x-cache)
    post "$NGX$PATH_GET_LIST" "$(body_of 1)" "$hdr" >/dev/null
    NGX_AFTER=$(header "$hdr" x-cache-status)
    AFTER="after the load gateway x-cache=$GW_AFTER, nginx X-Cache-Status=$NGX_AFTER"
else
    log "checking $SAMPLE random accounts are still HITs on both"
    CHECKED=0
    for ((i = 0; i < SAMPLE; i++)); do check_hit $((1 + (RANDOM * 32768 + RANDOM) % K)); done
    pages_check
    AFTER="after the load $SAMPLE random accounts were HITs on both, the gateway held $K pages and nginx $K cache files"
fi
if [[ "$CALLS_BEFORE" == "?" || "$CALLS_AFTER" == "?" ]]; then
    DURING="?"
else
    DURING=$((CALLS_AFTER - CALLS_BEFORE))
    ((DURING == 0)) || die "the emulator received $DURING calls during the rounds: not every request was a hit"
fi

rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
GW_RSS=$(rss_kb "$GW_PID")
NGX_RSS=0
for p in $(pgrep -P "$NGX_PID") "$NGX_PID"; do NGX_RSS=$((NGX_RSS + $(rss_kb "$p"))); done
NGX_CACHE_MB=$(du -sm "$TMP/nginx/cache" | awk '{print $1}')

# ---------------------------------------------------------------- report
GW_RPS=$(median <"$TMP/rps-gateway")
NGX_RPS=$(median <"$TMP/rps-nginx")
GW_P99=$(median <"$TMP/p99-gateway")
NGX_P99=$(median <"$TMP/p99-nginx")
GW_P50=$(median <"$TMP/p50-gateway")
NGX_P50=$(median <"$TMP/p50-nginx")

if [[ "$MODE" == hit ]]; then
    OUT=$(out_file hit)
    TITLE="bench/hit.sh: cache hits, chat-gateway vs nginx proxy_cache"
    WHAT="$BODIES distinct bodies round robin"
else
    OUT=$(out_file working-set)
    TITLE="MODE=working-set bench/hit.sh: cache hits over $K accounts, chat-gateway vs nginx proxy_cache"
    WHAT="$K accounts all cached, a uniform random one per request"
    FILLED="filled by wrk -t$FILL_CONNECTIONS -c$FILL_CONNECTIONS, every account once (misses through to the emulator): $FILL_TIMES"
fi
{
    report_head "$TITLE"
    echo "$("$NGINX" -v 2>&1); $(wrk -v 2>&1 | head -1 | awk '{print $1, $2}')"
    echo "wrk -t1 -c$CONNECTIONS -d$DURATION --latency on CPU $CLIENT_CPU; servers on CPU $SERVER_CPU;" \
        "$WHAT; $ROUNDS rounds each, alternating, after a $WARMUP warm-up"
    echo "gateway: TOKIO_WORKER_THREADS=1, log warn, $GW_DESC;" \
        "answers $AVG_GW bytes on average; RSS $((GW_RSS / 1024)) MB after the rounds"
    echo "nginx: worker_processes 1, proxy_cache keyed on \$request_body (keys_zone ${NGX_SIZES[0]}," \
        "max_size ${NGX_SIZES[1]}, open_file_cache max=${NGX_SIZES[2]}${NGX_CAPPED:-}), access_log off, sendfile off," \
        "keepalive both sides; answers $AVG_NGX bytes on average; RSS $((NGX_RSS / 1024)) MB," \
        "cache files $NGX_CACHE_MB MB (tmpfs)"
    [[ "$MODE" == hit ]] || echo "$FILLED"
    echo
    printf '%-5s  %-8s  %12s  %10s  %10s  %8s  %8s\n' round server "req/s" "p50 ms" "p99 ms" "before" "during"
    printf '%s' "$ROWS"
    QUIET_NOTE
    echo
    printf '%-8s  %12s  %10s  %10s\n' median "req/s" "p50 ms" "p99 ms"
    printf '%-8s  %12s  %10s  %10s\n' gateway "$GW_RPS" "$GW_P50" "$GW_P99"
    printf '%-8s  %12s  %10s  %10s\n' nginx "$NGX_RPS" "$NGX_P50" "$NGX_P99"
    echo
    echo "gateway/nginx: req/s x$(ratio "$GW_RPS" "$NGX_RPS"), p50 x$(ratio "$GW_P50" "$NGX_P50"), p99 x$(ratio "$GW_P99" "$NGX_P99")" \
        "(req/s: higher is better for the gateway; latency: lower)"
    echo "checks: $AFTER; emulator calls during the rounds: $DURING"
} | tee "$OUT"
log "written to ${OUT#"$ROOT/"}"
