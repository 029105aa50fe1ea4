#!/usr/bin/env bash
# Instructions per cache hit, counted by valgrind's callgrind: chat-gateway, nginx
# proxy_cache, nginx answering the same page with `return 200 '...'` (no cache),
# and a bare hyper 1.x server (examples/bare_hyper.rs: the same bytes and headers,
# no logic), the floor for anything built on hyper. The gateway is also measured
# on a fully cached profile/portrait_get of 20 accounts (20 item entries looked
# up and assembled), beside its get_list hit.
#
#   bench/instructions.sh
#   MODE=instructions bench/hit.sh          # the same
#   N1=500 N2=1500 bench/instructions.sh    # shorter
#   GATEWAY_ONLY=1 bench/instructions.sh    # the gateway alone (to compare two builds)
#   VARIANTS=plain bench/instructions.sh    # only the plain gateway
#
# The gateway is measured in VARIANTS (default: all four), each a fresh process:
#   plain    no access log, no caller tokens, no tracing
#   access   log.access = true (lines to stderr, a file here)
#   token    server.auth_tokens set; every request sends `Authorization: Bearer ...`
#   trace    [tracing] on (tracing.endpoint a port nobody listens on,
#            sample_ratio 0), requests without a traceparent: the hit is not sampled
#
# Instruction counts are user-space instructions executed by the server process
# (all its threads; the kernel's share, syscalls and TCP, is not counted), so they
# do not depend on what else the machine is doing: unlike req/s, they are
# repeatable on a shared, noisy VM.
#
# Method: each server runs alone under `valgrind --tool=callgrind
# --separate-threads=yes`, pinned to SERVER_CPU: the gateway with
# TOKIO_WORKER_THREADS=1 (its other threads, main and the config watcher, are
# counted too and shown apart), nginx with `master_process off; daemon off;` (one
# process serving both the proxy_cache location and, on a second port, the static
# `return 200`), bare_hyper on a tokio current-thread runtime. The page (ACCOUNT's
# first get_list page, 1.2 KB by default) is fetched once (a MISS that fills the
# caches), then WARMUP_REQS hits; then two measured batches of N1 and N2 requests
# on one keep-alive connection (bench/exact_client.py, outside valgrind), each
# between `callgrind_control --zero` and `--dump`:
#     instructions per request = (I(N2) - I(N1)) / (N2 - N1)
# which cancels what a batch costs whatever its size (its connection's accept
# and close). Every answer of every batch is checked: HTTP 200, `x-cache: HIT`
# (nginx proxy_cache: `X-Cache-Status: HIT`), and the body length of that
# server's cached page. nginx static and bare_hyper answer the gateway's cached
# page with constant `x-cache: HIT`, `age: 0` and a 16-hex-digit `x-request-id`.
#
# Environment:
#   N1 (1000), N2 (3000)  the two measured batch sizes (N2 > N1)
#   WARMUP_REQS (300)     hits before the measured batches
#   ACCOUNT (743)         account number of the page (user_0743 of the default
#                         1000-account emulator world: a 1,273-byte answer)
#   PORTRAIT_ITEMS (20)   accounts named by the portrait_get request (every 37th
#                         account from ACCOUNT on, TagList Nick + Image + Gender)
#   SERVER_CPU (0)        CPU the servers (under valgrind) are pinned to
#   CLIENT_CPU (1)        CPU the emulator is pinned to
#   NO_BUILD (unset)      set to 1 to skip `cargo build --release`
#   GATEWAY_ONLY (unset)  set to 1 to measure the gateway alone (no nginx, no bare hyper)
#   VARIANTS (plain access token trace)  the gateway configurations measured
#   GATEWAY_BIN (unset)   measure this chat-gateway binary instead of the build (e.g. a
#                         copy of another commit's, to compare in alternating runs)
#   KEEP_TMP (unset)      set to 1 to keep the temp dir (configs, logs, callgrind files)
#
# Output: a table on stdout, also written to bench/out/instructions-<date>.txt,
# and callgrind_annotate listings of the busiest thread of each server in
# bench/out/instructions-<date>-<server>.annotate.txt (where the instructions go).
# Needs: valgrind, python3, nginx, curl, taskset (installed with apt-get when missing).
set -euo pipefail

SCRIPT=instructions.sh
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

N1=${N1:-1000}
N2=${N2:-3000}
WARMUP_REQS=${WARMUP_REQS:-300}
ACCOUNT=${ACCOUNT:-743}
if ! [[ "$N1" =~ ^[0-9]+$ && "$N2" =~ ^[0-9]+$ ]] || ((N1 < 1 || N2 <= N1)); then
    die "need 1 <= N1 < N2 (N1=$N1, N2=$N2)"
fi
CLIENT="$ROOT/bench/exact_client.py"
START_TIMEOUT=300 # valgrind starts slowly

ensure_tools valgrind:valgrind callgrind_control:valgrind callgrind_annotate:valgrind python3:python3
build bare_hyper
BARE="$ROOT/target/release/examples/bare_hyper"
if [[ -n "${GATEWAY_BIN:-}" ]]; then
    [[ -x "$GATEWAY_BIN" ]] || die "GATEWAY_BIN $GATEWAY_BIN is not an executable"
    BIN=$GATEWAY_BIN
fi
VARIANTS=${VARIANTS:-plain access token trace}
for v in $VARIANTS; do
    [[ " plain access token trace " == *" $v "* ]] || die "unknown variant $v (plain, access, token, trace)"
done
[[ " $VARIANTS " == *" plain "* ]] || die "VARIANTS must include plain (the others are compared to it)"
# plain first: the others are compared to it, and nginx and bare hyper answer its page.
ordered=plain
for v in $VARIANTS; do [[ $v == plain ]] || ordered+=" $v"; done
VARIANTS=$ordered
make_tmp instructions
mkdir -p "$TMP/cg"

PORTRAIT_ITEMS=${PORTRAIT_ITEMS:-20}
PATH_PORTRAIT=/v4/profile/portrait_get
start_emulator 1000 "$CLIENT_CPU"
ACCOUNT_WIDTH=4
write_gateway_config $'[cache]\nttl_secs = 3600\n\n[cache.commands."profile/portrait_get"]\nttl_secs = 3600\n\n[log]\nformat = "text"\nlevel = "warn"'
body_of "$ACCOUNT" >"$TMP/request.json"
# The portrait_get request: PORTRAIT_ITEMS accounts of the world.
python3 - "$ACCOUNT" "$PORTRAIT_ITEMS" >"$TMP/portrait.json" <<'PY'
import json, sys
first, n = int(sys.argv[1]), int(sys.argv[2])
accounts = ["user_%04d" % ((first + 37 * i - 1) % 1000 + 1) for i in range(n)]
print(json.dumps({"To_Account": accounts,
                  "TagList": ["Tag_Profile_IM_Nick", "Tag_Profile_IM_Image", "Tag_Profile_IM_Gender"]},
                 separators=(",", ":")), end="")
PY
REQ="$TMP/request.json"

# valgrind_for NAME: the command prefix running a server under callgrind.
valgrind_for() {
    CG_PREFIX=$1
    VG=(valgrind --tool=callgrind --separate-threads=yes
        "--callgrind-out-file=$TMP/cg/$1.%p" --log-file="$TMP/cg/$1.valgrind.log")
}

# prime NAME URL HEADER [FILL]: with FILL, one request to fill the cache; then the
# answer must carry HEADER: HIT; sets PAGE_LEN to its body's length and saves the
# body in $TMP/page-NAME.json; then WARMUP_REQS hits.
prime() {
    local name=$1 url=$2 hdr=$3 fill=${4:-}
    if [[ -n "$fill" ]]; then
        post "$url" "$(cat "$REQ")" /dev/null --max-time 60 "${CURL_ARGS[@]}" >/dev/null \
            || die "$name: first request failed"
    fi
    post "$url" "$(cat "$REQ")" "$TMP/headers" --max-time 60 "${CURL_ARGS[@]}" >"$TMP/page-$name.json" \
        || die "$name: request failed"
    [[ "$(header "$TMP/headers" "$hdr")" == HIT ]] || die "$name: not a HIT: $(cat "$TMP/headers")"
    grep -q '"ErrorCode" *: *0[,}]' "$TMP/page-$name.json" || die "$name answered: $(cat "$TMP/page-$name.json")"
    PAGE_LEN=$(wc -c <"$TMP/page-$name.json")
    client "$name" "$url" "$hdr" "$WARMUP_REQS" >/dev/null
}

client() { # NAME URL HEADER N
    python3 "$CLIENT" --url "$2" --body-file "$REQ" -n "$4" \
        --expect "$3=HIT" --length "$PAGE_LEN" "${CLIENT_ARGS[@]}" 2>"$TMP/client.err" \
        || die "$1: $(cat "$TMP/client.err")"
}
# Extra request headers of the variant being measured (curl's and the client's).
CURL_ARGS=()
CLIENT_ARGS=()

# batch NAME PID URL HEADER N: zero the counters, N requests, dump; prints
# "thread instructions" lines, one per thread of that dump.
batch() {
    local name=$1 pid=$2 n=$5 after i f
    callgrind_control --zero "$pid" >"$TMP/cg/control.log" 2>&1 || die "callgrind_control --zero $pid failed: $(cat "$TMP/cg/control.log")"
    client "$name" "$3" "$4" "$n" >/dev/null
    : >"$TMP/cg/dump.mark"
    callgrind_control --dump "$pid" >"$TMP/cg/control.log" 2>&1 || die "callgrind_control --dump $pid failed: $(cat "$TMP/cg/control.log")"
    # The dump is written by the server's process: wait for its files to settle.
    for i in $(seq 300); do
        after=$(find "$TMP/cg" -name "$CG_PREFIX.$pid.*" -newer "$TMP/cg/dump.mark" | wc -l)
        ((after > 0)) && break
        sleep 0.1
    done
    ((after > 0)) || die "$name: no callgrind dump appeared"
    sleep 0.5
    # One file per thread: PREFIX.PID.DUMP-THREAD.
    for f in $(find "$TMP/cg" -name "$CG_PREFIX.$pid.*-*" -newer "$TMP/cg/dump.mark" | sort); do
        awk -v f="$f" '/^summary:/ { t = f; sub(/.*-/, "", t); print t + 0, $2 }' "$f"
        LAST_DUMP_FILES+=("$f")
    done
}

# measure NAME PID URL HEADER: the two batches; sets PER_REQ (instructions per
# request), BATCH1/BATCH2 (whole-batch per-request figures) and THREADS (per
# thread, per request: "n:instr ...").
declare -A PER_REQ BATCH1 BATCH2 THREADS ANNOTATE PAGE_OF OWN
# serve_in FILE: the instructions a callgrind dump counts in the gateway's connection
# task (http1::drive and what it calls: socket reads and writes, parsing, the lookup,
# the answer, the log line), inclusive. (drive, not the serve loop inside it: the
# compiler may inline one into the other, never drive into the runtime.)
serve_in() {
    callgrind_annotate --inclusive=yes --threshold=100 "$1" 2>/dev/null \
        | awk '/http1::drive::\{\{closure\}\}/ { gsub(",", "", $1); v = $1 + 0; if (v > m) m = v } END { printf "%d\n", m + 0 }'
}
# busiest_file BATCH_TXT FILES...: the dump file of the batch's busiest thread.
busiest_file() {
    local txt=$1 busiest f
    shift
    busiest=$(sort -k2 -n -r "$txt" | awk 'NR == 1 {print $1}')
    for f in "$@"; do
        if ((10#${f##*-} == busiest)); then echo "$f"; fi
    done
}

measure() {
    local name=$1 pid=$2 url=$3 hdr=$4
    log "$name: $N1 then $N2 requests under callgrind"
    LAST_DUMP_FILES=()
    batch "$name" "$pid" "$url" "$hdr" "$N1" >"$TMP/cg/$name-b1.txt"
    local first_files=("${LAST_DUMP_FILES[@]}")
    LAST_DUMP_FILES=()
    batch "$name" "$pid" "$url" "$hdr" "$N2" >"$TMP/cg/$name-b2.txt"
    local t1 t2
    t1=$(awk '{s += $2} END {print s}' "$TMP/cg/$name-b1.txt")
    t2=$(awk '{s += $2} END {print s}' "$TMP/cg/$name-b2.txt")
    PER_REQ[$name]=$(awk -v a="$t1" -v b="$t2" -v n1="$N1" -v n2="$N2" 'BEGIN { printf "%.0f", (b - a) / (n2 - n1) }')
    BATCH1[$name]=$(awk -v a="$t1" -v n="$N1" 'BEGIN { printf "%.0f", a / n }')
    BATCH2[$name]=$(awk -v a="$t2" -v n="$N2" 'BEGIN { printf "%.0f", a / n }')
    THREADS[$name]=$(awk -v n1="$N1" -v n2="$N2" 'NR == FNR { a[$1] = $2; next } { v = sprintf("%.0f", ($2 - a[$1]) / (n2 - n1)) + 0; printf "%s%d:%d", sep, $1, v; sep = " " }' \
        "$TMP/cg/$name-b1.txt" "$TMP/cg/$name-b2.txt")
    # The busiest thread's file of the larger batch, for callgrind_annotate.
    local busiest
    busiest=$(sort -k2 -n -r "$TMP/cg/$name-b2.txt" | awk 'NR == 1 {print $1}')
    for f in "${LAST_DUMP_FILES[@]}"; do
        local t=${f##*-}
        if ((10#$t == busiest)); then ANNOTATE[$name]=$f; fi
    done
    PAGE_OF[$name]=$PAGE_LEN
    if [[ $name == gateway* ]]; then
        # Own work: the connection task's instructions, plus the other threads' (the
        # access log's writer, the span exporter), without the worker's scheduling
        # and idle wake-ups (which grow with wall time, so with machine load).
        local f1 f2 s1 s2 w1 w2
        f1=$(busiest_file "$TMP/cg/$name-b1.txt" "${first_files[@]}")
        f2=${ANNOTATE[$name]}
        s1=$(serve_in "$f1")
        s2=$(serve_in "$f2")
        w1=$(sort -k2 -n -r "$TMP/cg/$name-b1.txt" | awk 'NR == 1 {print $2}')
        w2=$(sort -k2 -n -r "$TMP/cg/$name-b2.txt" | awk 'NR == 1 {print $2}')
        OWN[$name]=$(awk -v s1="$s1" -v s2="$s2" -v t1="$t1" -v t2="$t2" -v w1="$w1" -v w2="$w2" -v n1="$N1" -v n2="$N2" \
            'BEGIN { printf "%.0f", ((s2 - s1) + ((t2 - w2) - (t1 - w1))) / (n2 - n1) }')
    fi
    log "  $name: ${PER_REQ[$name]} instructions per request${OWN[$name]:+ (own work ${OWN[$name]})}"
}

thread_names() { # PID -> "n:comm ..." in creation (TID) order, as valgrind numbers them
    local i=0 t out=""
    for t in $(cd "/proc/$1/task" && printf '%s\n' * | sort -n); do
        i=$((i + 1))
        out+="${out:+, }$i=$(tr ' ' '_' <"/proc/$1/task/$t/comm" | sed 's/^callgrind-.*/main/')"
    done
    echo "$out"
}
forget_pid() { # PID: stop it and drop it from PIDS
    local p keep=()
    stop_pid "$1"
    for p in "${PIDS[@]}"; do [[ "$p" == "$1" ]] || keep+=("$p"); done
    PIDS=("${keep[@]}")
}

# ---------------------------------------------------------------- the gateway
# Each variant is set through the environment (CHAT_GATEWAY__*), over the same file.
TOKEN=bench-caller-token-0123456789abcdef
declare -A GW_LABEL=(
    [gateway]="chat-gateway"
    [gateway-access]="  log.access = true"
    [gateway-token]="  caller token (Bearer)"
    [gateway-trace]="  tracing on, hit not sampled"
)
declare -A GW_THREADS_OF
for v in $VARIANTS; do
    name=gateway
    [[ $v == plain ]] || name=gateway-$v
    env_vars=()
    CURL_ARGS=()
    CLIENT_ARGS=()
    case $v in
        access) env_vars=(CHAT_GATEWAY__LOG__ACCESS=true) ;;
        token)
            env_vars=(CHAT_GATEWAY__SERVER__AUTH_TOKENS=$TOKEN)
            CURL_ARGS=(-H "Authorization: Bearer $TOKEN")
            CLIENT_ARGS=(--header "Authorization=Bearer $TOKEN")
            ;;
        trace)
            free_port OTLP_PORT
            env_vars=(CHAT_GATEWAY__TRACING__ENDPOINT="http://127.0.0.1:$OTLP_PORT/v1/traces"
                CHAT_GATEWAY__TRACING__SAMPLE_RATIO=0)
            ;;
    esac
    valgrind_for "$name"
    log "gateway variant $v${env_vars[*]:+: ${env_vars[*]}}"
    ((${#env_vars[@]} == 0)) || export "${env_vars[@]}"
    start_gateway "$SERVER_CPU" "${VG[@]}"
    for e in "${env_vars[@]}"; do unset "${e%%=*}"; done
    prime "$name" "$GW$PATH_GET_LIST" x-cache fill
    [[ $v == plain ]] && cp "$TMP/page-$name.json" "$TMP/page.json"
    GW_THREADS_OF[$name]=$(thread_names "$GW_PID")
    measure "$name" "$GW_PID" "$GW$PATH_GET_LIST" x-cache
    if [[ $v == plain ]]; then
        # The same process: a fully cached portrait_get of PORTRAIT_ITEMS accounts.
        REQ="$TMP/portrait.json"
        prime gateway-portrait "$GW$PATH_PORTRAIT" x-cache fill
        measure gateway-portrait "$GW_PID" "$GW$PATH_PORTRAIT" x-cache
        REQ="$TMP/request.json"
    fi
    if [[ $v == access ]]; then
        sleep 0.5 # the writer thread flushes every 50 ms
        grep -q ' access method=POST' "$TMP/gateway.log" || die "the access variant wrote no access line"
    fi
    forget_pid "$GW_PID"
done
CURL_ARGS=()
CLIENT_ARGS=()
GW_THREADS=${GW_THREADS_OF[gateway]}

if [[ -z "${GATEWAY_ONLY:-}" ]]; then
# ---------------------------------------------------------------- nginx
# The static answer: the gateway's cached page, in nginx's single-quoted string.
grep -q '\$' "$TMP/page.json" && die "the page holds a \$, which nginx's return would expand"
free_port NGX_STATIC_PORT
render_nginx 10m 64m 1000
{
    echo "# The same page, answered by nginx itself: no cache, no upstream."
    echo "server {"
    echo "    listen 127.0.0.1:$NGX_STATIC_PORT;"
    echo "    location = $PATH_GET_LIST {"
    echo "        default_type application/json;"
    echo "        add_header X-Cache HIT;"
    echo "        add_header Age 0;"
    echo "        add_header X-Request-Id 5f0c2a9e81d3b7c4;"
    printf "        return 200 '%s';\n" "$(sed -e "s/[\\\\']/\\\\&/g" "$TMP/page.json")"
    echo "    }"
    echo "}"
} >"$TMP/nginx/conf.d/static.conf"
valgrind_for nginx
start_nginx "$SERVER_CPU" 'daemon off; master_process off;' "${VG[@]}"
NGX_STATIC="http://127.0.0.1:$NGX_STATIC_PORT"
prime nginx-proxy "$NGX$PATH_GET_LIST" x-cache-status fill
measure nginx-proxy "$NGX_PID" "$NGX$PATH_GET_LIST" x-cache-status
prime nginx-static "$NGX_STATIC$PATH_GET_LIST" x-cache
cmp -s "$TMP/page-nginx-static.json" "$TMP/page.json" || die "nginx static answers another page than the gateway's"
measure nginx-static "$NGX_PID" "$NGX_STATIC$PATH_GET_LIST" x-cache
forget_pid "$NGX_PID"

# ---------------------------------------------------------------- bare hyper
free_port BARE_PORT
BARE_URL="http://127.0.0.1:$BARE_PORT"
valgrind_for bare
log "starting bare_hyper on $BARE_URL (CPU $SERVER_CPU)"
taskset -c "$SERVER_CPU" "${VG[@]}" "$BARE" "127.0.0.1:$BARE_PORT" "$TMP/page.json" >"$TMP/bare.log" 2>&1 &
BARE_PID=$!
PIDS+=("$BARE_PID")
wait_for bare_hyper "$BARE_PID" "$START_TIMEOUT" curl -fsS --max-time 5 -X POST "$BARE_URL$PATH_GET_LIST"
prime bare "$BARE_URL$PATH_GET_LIST" x-cache
cmp -s "$TMP/page-bare.json" "$TMP/page.json" || die "bare_hyper answers another page than the gateway's"
measure bare "$BARE_PID" "$BARE_URL$PATH_GET_LIST" x-cache
forget_pid "$BARE_PID"
fi

# ---------------------------------------------------------------- report
OUT=$(out_file instructions)
BASE=${OUT%.txt}
for s in "${!PER_REQ[@]}"; do
    if [[ -n "${ANNOTATE[$s]:-}" ]]; then
        # Whole listings into files first: head closing a pipe would stop the script.
        callgrind_annotate --auto=no --inclusive=yes --threshold=99 "${ANNOTATE[$s]}" >"$TMP/incl.txt" 2>&1 || true
        callgrind_annotate --auto=no --inclusive=no --threshold=100 "${ANNOTATE[$s]}" >"$TMP/self.txt" 2>&1 || true
        {
            echo "# $s: callgrind_annotate of its busiest thread over the N2=$N2 batch (divide by $N2 for per request)"
            echo "# inclusive (a function and what it calls):"
            sed -n '1,120p' "$TMP/incl.txt"
            echo
            echo "# self (instructions in the function itself; the thread's outermost frames,"
            echo "# shown first at 100%, are an artifact of zeroing the counters mid-run):"
            sed -n '/file:function/,$p' "$TMP/self.txt" | sed -n '1,80p'
        } >"$BASE-$s.annotate.txt"
    fi
done
row() { # NAME LABEL
    printf '%-30s  %12s  %12s  %12s  %7s  %9s\n' "$2" "${PER_REQ[$1]}" "${BATCH1[$1]}" "${BATCH2[$1]}" "${PAGE_OF[$1]}" "${OWN[$1]:--}"
}
{
    report_head "bench/instructions.sh: user-space instructions per cache hit (callgrind)"
    echo "$(valgrind --version); $("$NGINX" -v 2>&1); $(python3 --version)"
    echo "page: user_$(printf %04d "$ACCOUNT")'s first get_list page; batches of N1=$N1 and N2=$N2 keep-alive requests" \
        "on one connection after $WARMUP_REQS warm-up hits; every answer checked (200, HIT, length)"
    echo
    printf '%-30s  %12s  %12s  %12s  %7s  %9s\n' server "instr/req" "batch N1/N1" "batch N2/N2" "bytes" "own work"
    for v in $VARIANTS; do
        name=gateway
        [[ $v == plain ]] || name=gateway-$v
        row "$name" "${GW_LABEL[$name]}"
        [[ $v == plain ]] && row gateway-portrait "chat-gateway portrait_get x$PORTRAIT_ITEMS"
    done
    if [[ -z "${GATEWAY_ONLY:-}" ]]; then
        row nginx-proxy "nginx proxy_cache"
        row nginx-static "nginx return 200 (static)"
        row bare "bare hyper 1.x (floor)"
    fi
    echo "(instr/req = (I(N2) - I(N1)) / (N2 - N1): the difference of the two batches, which"
    echo " cancels each batch's fixed cost; the batch columns are each batch's total / its size;"
    echo " own work: the same difference for the gateway's connection task (http1::drive,"
    echo " inclusive: reads, parsing, lookup, answer, writes) plus its threads other than the"
    echo " worker (access-log writer, span exporter), i.e. without the runtime's scheduling and"
    echo " idle wake-ups, which grow with wall time and so with the machine's load)"
    echo
    for v in $VARIANTS; do
        [[ $v == plain ]] && continue
        echo "gateway $v / plain: x$(ratio "${PER_REQ[gateway-$v]}" "${PER_REQ[gateway]}") ($(awk -v a="${PER_REQ[gateway-$v]}" -v b="${PER_REQ[gateway]}" 'BEGIN { printf "%+d", a - b }') per hit; own work $(awk -v a="${OWN[gateway-$v]}" -v b="${OWN[gateway]}" 'BEGIN { printf "%+d", a - b }'))"
    done
    echo
    echo "portrait_get of $PORTRAIT_ITEMS (fully cached) / get_list hit: x$(ratio "${PER_REQ[gateway-portrait]}" "${PER_REQ[gateway]}")"
    echo
    if [[ -z "${GATEWAY_ONLY:-}" ]]; then
        echo "gateway / nginx static:      x$(ratio "${PER_REQ[gateway]}" "${PER_REQ[nginx-static]}")"
        echo "gateway / nginx proxy_cache: x$(ratio "${PER_REQ[gateway]}" "${PER_REQ[nginx-proxy]}")"
        echo "gateway / bare hyper:        x$(ratio "${PER_REQ[gateway]}" "${PER_REQ[bare]}")"
        echo "bare hyper / nginx static:   x$(ratio "${PER_REQ[bare]}" "${PER_REQ[nginx-static]}")"
        echo
    fi
    echo "per thread, instructions per request (valgrind thread number: count):"
    echo "  gateway:      ${THREADS[gateway]}   threads: $GW_THREADS"
    echo "  portrait_get: ${THREADS[gateway-portrait]}"
    for v in $VARIANTS; do
        [[ $v == plain ]] && continue
        echo "  gateway $v: ${THREADS[gateway-$v]}   threads: ${GW_THREADS_OF[gateway-$v]}"
    done
    if [[ -z "${GATEWAY_ONLY:-}" ]]; then
        echo "  nginx:        proxy_cache ${THREADS[nginx-proxy]}, static ${THREADS[nginx-static]}"
        echo "  bare hyper:   ${THREADS[bare]}"
    fi
    echo "(gateway: TOKIO_WORKER_THREADS=1, log warn, cache.ttl_secs 3600; nginx: master_process off,"
    echo " bench/nginx/nginx.conf.tmpl plus a static server; bare hyper: examples/bare_hyper.rs)"
} | tee "$OUT"
log "written to ${OUT#"$ROOT/"} (and $(basename "$BASE")-*.annotate.txt)"
