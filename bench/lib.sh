# shellcheck shell=bash
# Shared pieces of the benchmark scripts (bench/hit.sh, bench/instructions.sh,
# bench/miss.sh): tools, processes and their clean-up, ports, the emulator, the
# gateway and nginx, wrk rounds with the quiet-CPU check, and the report helpers.
#
# Sourced, not run. The sourcing script sets SCRIPT (its name, for log lines) and
# ROOT (the repository) first; `set -euo pipefail` is in force.

BIN="$ROOT/target/release/chat-gateway"
PATH_GET_LIST=/v4/recentcontact/get_list
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
QUIET_PCT=${QUIET_PCT:-5}
QUIET_WAIT=${QUIET_WAIT:-300}
ROUND_TRIES=${ROUND_TRIES:-5}

log() { printf '[%s] %s\n' "$SCRIPT" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------- tools
as_root() {
    if [[ $(id -u) -eq 0 ]]; then "$@"
    elif command -v sudo >/dev/null 2>&1; then sudo "$@"
    else die "need root (or sudo) to run: $*"; fi
}
apt_updated=""
apt_install() {
    command -v apt-get >/dev/null 2>&1 || die "missing $*, and no apt-get to install it"
    if [[ -z "$apt_updated" ]]; then
        log "apt-get update"
        as_root apt-get update -qq >/dev/null
        apt_updated=1
    fi
    log "installing $*"
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
# Which package brings /usr/sbin/nginx (proxy_cache is in every flavour):
# `nginx` everywhere current (on Debian 12 it is the binary itself and
# nginx-light only adds a module on top; elsewhere it pulls a flavour in);
# nginx-light or nginx-core where `nginx` has no candidate.
nginx_package() {
    local pkg
    for pkg in nginx nginx-light nginx-core; do
        if apt-cache policy "$pkg" 2>/dev/null | grep -q 'Candidate: [0-9]'; then
            echo "$pkg"; return
        fi
    done
    echo nginx
}
# ensure_tools [COMMAND:PACKAGE ...]: curl, wrk, taskset, nginx and the extra
# commands named, installed with apt-get when missing.
ensure_tools() {
    local missing=() spec
    command -v curl >/dev/null 2>&1 || missing+=(curl)
    command -v wrk >/dev/null 2>&1 || missing+=(wrk)
    command -v taskset >/dev/null 2>&1 || missing+=(util-linux)
    for spec in "$@"; do
        command -v "${spec%%:*}" >/dev/null 2>&1 || missing+=("${spec#*:}")
    done
    if ((${#missing[@]})); then apt_install "${missing[@]}"; fi
    if ! command -v nginx >/dev/null 2>&1 && [[ ! -x /usr/sbin/nginx ]]; then
        [[ -n "$apt_updated" ]] || { as_root apt-get update -qq >/dev/null; apt_updated=1; }
        apt_install "$(nginx_package)"
        # The package may have started the distro's nginx on :80; these scripts run
        # their own, so stop that one (it was not running before the install).
        if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet nginx 2>/dev/null; then
            log "stopping the nginx service the package started"
            as_root systemctl stop nginx >/dev/null 2>&1 || true
        fi
    fi
    NGINX=$(command -v nginx || echo /usr/sbin/nginx)
    [[ -x "$NGINX" ]] || die "nginx not found after install"
    if (($(nproc) < 2)); then
        log "warning: $(nproc) CPU: server and client will share it; numbers will be poor"
        CLIENT_CPU=$SERVER_CPU
    fi
}

# build [EXAMPLE ...]: the release binary (and examples), unless NO_BUILD=1.
build() {
    local ex args=(--bin chat-gateway)
    for ex in "$@"; do args+=(--example "$ex"); done
    if [[ -z "${NO_BUILD:-}" ]]; then
        log "cargo build --release ${args[*]} (may wait for the shared target dir's lock)"
        (cd "$ROOT" && cargo build --release "${args[@]}" >&2)
    fi
    [[ -x "$BIN" ]] || die "$BIN not built"
    for ex in "$@"; do
        [[ -x "$ROOT/target/release/examples/$ex" ]] || die "example $ex not built"
    done
}

# ---------------------------------------------------------------- processes
TMP=""
PIDS=()
WRK_PID=""
# stop_pid PID: TERM, a few seconds to exit, then KILL.
stop_pid() {
    local pid=$1
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
cleanup() {
    local rc=$? pid
    [[ -n "$WRK_PID" ]] && kill -TERM "$WRK_PID" 2>/dev/null
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
    if [[ -n "$TMP" && -d "$TMP" ]]; then
        if [[ -n "${KEEP_TMP:-}" || $rc -ne 0 ]]; then
            log "logs and configs kept in $TMP"
        else
            rm -rf "$TMP"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# make_tmp NAME: TMP, in memory where possible (nginx's cache files then never
# touch a disk), readable by nginx workers (an unprivileged user when the master
# is root).
make_tmp() {
    local base=/tmp
    [[ -d /dev/shm && -w /dev/shm ]] && base=/dev/shm
    TMP=$(mktemp -d "$base/chat-gateway-$1.XXXXXX")
    chmod 0755 "$TMP"
    mkdir -p "$TMP/nginx"
}

# A loopback port nobody listens on, from 20000-31999: below Linux's default
# ephemeral range (32768-60999), so outgoing connections do not hold it; checked
# by trying to connect.
USED_PORTS=" "
free_port() { # VAR: sets VAR to a free port (not in a subshell, so USED_PORTS sticks)
    local p i
    for i in $(seq 200); do
        p=$((20000 + RANDOM % 12000))
        [[ "$USED_PORTS" == *" $p "* ]] && continue
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            USED_PORTS+="$p "
            printf -v "$1" '%s' "$p"
            return
        fi
    done
    die "no free port found"
}

# wait_for NAME PID TIMEOUT_S CMD...: polls CMD until it succeeds.
wait_for() {
    local name=$1 pid=$2 timeout=$3 i
    shift 3
    for ((i = 0; i < timeout * 10; i++)); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        kill -0 "$pid" 2>/dev/null || die "$name exited during start-up (see $TMP)"
        sleep 0.1
    done
    die "$name not ready after ${timeout}s (see $TMP)"
}

# ---------------------------------------------------------------- requests
# The emulator names accounts user_0001 ..., zero padded to 4 digits, or more when
# it has more accounts (user_000001 ... with 100000).
account_width() { local w=${#1}; ((w < 4)) && w=4; echo "$w"; }
ACCOUNT_WIDTH=4
body_of() { # N -> get_list body for account N (ACCOUNT_WIDTH digits)
    printf '{"From_Account":"user_%0*d","TimeStamp":0,"StartIndex":0,"TopTimeStamp":0,"TopStartIndex":0,"AssistFlags":63}' \
        "$ACCOUNT_WIDTH" "$1"
}

# post URL BODY HEADERFILE [CURL ARGS...] -> body on stdout, headers into HEADERFILE
post() {
    local url=$1 body=$2 hdr=$3
    shift 3
    curl -sS --max-time 10 -X POST "$url" -H 'Content-Type: application/json' \
        --data-binary "$body" -D "$hdr" "$@"
}
header() { # FILE NAME -> value
    tr -d '\r' <"$1" | awk -v n="$(tr '[:upper:]' '[:lower:]' <<<"$2")" \
        'BEGIN{FS=": "} tolower($1)==n {print $2; exit}'
}

# ---------------------------------------------------------------- the servers
# start_emulator ACCOUNTS CPU: EMU, EMU_PORT, EMU_PID. Rate limit off: a warm-up
# would otherwise trip its 200 calls/s and nginx would cache the 60007 answers
# (HTTP 200).
start_emulator() {
    free_port EMU_PORT
    EMU="http://127.0.0.1:$EMU_PORT"
    log "starting the emulator on $EMU ($1 accounts, CPU $2)"
    taskset -c "$2" "$BIN" emulator --listen "127.0.0.1:$EMU_PORT" --accounts "$1" \
        --rate-limit 0 >"$TMP/emulator.log" 2>&1 &
    EMU_PID=$!
    PIDS+=("$EMU_PID")
    wait_for emulator "$EMU_PID" 120 curl -fsS --max-time 1 "$EMU/__emulator/health"
}

# write_gateway_config EXTRA_TOML: GW_PORT, GW, $TMP/gateway.toml (the emulator
# as upstream), USERSIG (an admin UserSig for direct calls), UPSTREAM_URI (the
# get_list path with Chat's query, credentials included).
write_gateway_config() {
    free_port GW_PORT
    GW="http://127.0.0.1:$GW_PORT"
    cat >"$TMP/gateway.toml" <<EOF
[server]
listen = "127.0.0.1:$GW_PORT"

[chat]
sdkappid = 1400000000
identifier = "administrator"
secret_key = "emulator-secret-key"
region = "singapore"
base_url = "$EMU"

$1
EOF
    "$BIN" check-config --config "$TMP/gateway.toml" >/dev/null 2>"$TMP/check-config.log" \
        || die "generated gateway config invalid: $(cat "$TMP/check-config.log")"
    # An admin UserSig for nginx's upstream URL and direct calls (the gateway
    # signs its own).
    USERSIG=$("$BIN" usersig --config "$TMP/gateway.toml")
    [[ -n "$USERSIG" && "$USERSIG" =~ ^[A-Za-z0-9*_.~-]+$ ]] || die "unexpected usersig: $USERSIG"
    UPSTREAM_URI="$PATH_GET_LIST?sdkappid=1400000000&identifier=administrator&usersig=$USERSIG&random=1&contenttype=json"
    local out
    out=$(post "$EMU$UPSTREAM_URI" "$(body_of 1)" /dev/null) || die "emulator: direct call failed"
    grep -q '"ErrorCode" *: *0[,}]' <<<"$out" || die "emulator: direct call answered: $out"
}

# start_gateway CPU [PREFIX...]: GW_PID. One tokio worker; PREFIX (e.g. valgrind
# and its options) goes before the binary.
start_gateway() {
    local cpu=$1
    shift
    log "starting the gateway on $GW (CPU $cpu, TOKIO_WORKER_THREADS=1)"
    TOKIO_WORKER_THREADS=1 taskset -c "$cpu" "$@" "$BIN" --config "$TMP/gateway.toml" \
        >"$TMP/gateway.log" 2>&1 &
    GW_PID=$!
    PIDS+=("$GW_PID")
    wait_for gateway "$GW_PID" "${START_TIMEOUT:-30}" curl -fsS --max-time 1 "$GW/readyz"
}

# render_nginx KEYS_ZONE MAX_SIZE OPEN_FILES: NGX_PORT, NGX, $TMP/nginx/nginx.conf
# from NGINX_TMPL (bench/nginx/nginx.conf.tmpl). Extra server blocks may be put
# in $TMP/nginx/conf.d/*.conf.
nofile() { # OPEN_FILES -> worker_rlimit_nofile: room for them and 4096 more, within the hard limit
    local hard want=$(($1 + 4096))
    hard=$(ulimit -Hn)
    [[ "$hard" == unlimited ]] || ((want <= hard)) || want=$hard
    echo "$want"
}
render_nginx() {
    free_port NGX_PORT
    NGX="http://127.0.0.1:$NGX_PORT"
    mkdir -p "$TMP/nginx/conf.d"
    esc() { printf '%s' "$1" | sed -e 's/[\\|&]/\\&/g'; }
    sed -e "s|@DIR@|$(esc "$TMP/nginx")|g" \
        -e "s|@EMU_PORT@|$EMU_PORT|g" \
        -e "s|@NGX_PORT@|$NGX_PORT|g" \
        -e "s|@UPSTREAM_URI@|$(esc "$UPSTREAM_URI")|g" \
        -e "s|@KEYS_ZONE@|$1|g" \
        -e "s|@MAX_SIZE@|$2|g" \
        -e "s|@OPEN_FILES@|$3|g" \
        -e "s|@NOFILE@|$(nofile "$3")|g" \
        "${NGINX_TMPL:-$ROOT/bench/nginx/nginx.conf.tmpl}" >"$TMP/nginx/nginx.conf"
}

# start_nginx CPU GLOBALS [PREFIX...]: NGX_PID; GLOBALS are -g directives
# ('daemon off;' at least).
start_nginx() {
    local cpu=$1 globals=$2
    shift 2
    "$NGINX" -t -q -p "$TMP/nginx" -c "$TMP/nginx/nginx.conf" -g "$globals" \
        2>"$TMP/nginx-t.log" || die "nginx -t failed: $(cat "$TMP/nginx-t.log")"
    log "starting nginx on $NGX (CPU $cpu)"
    taskset -c "$cpu" "$@" "$NGINX" -p "$TMP/nginx" -c "$TMP/nginx/nginx.conf" -g "$globals" \
        >"$TMP/nginx/stdout.log" 2>&1 &
    NGX_PID=$!
    PIDS+=("$NGX_PID")
    wait_for nginx "$NGX_PID" "${START_TIMEOUT:-30}" curl -fsS --max-time 1 "$NGX/nginx-health"
}

emulator_stat() { # FIELD -> the emulator's stats number FIELD (total_calls ...), or "?"
    local n
    n=$(curl -fsS --max-time 5 "$EMU/__emulator/stats" 2>/dev/null \
        | sed -n "s/.*\"$1\" *: *\([0-9][0-9]*\).*/\1/p")
    echo "${n:-?}"
}
emulator_calls() { emulator_stat total_calls; }
emulator_codes() { # the emulator's answers_per_code object, e.g. {"0":2000}
    curl -fsS --max-time 5 "$EMU/__emulator/stats" | tr -d ' \n' \
        | sed -n 's/.*"answers_per_code":\({[^}]*}\).*/\1/p'
}
gateway_metric() { # NAME -> value of an unlabelled metric, or "?"
    local v
    v=$(curl -fsS --max-time 5 "$GW/metrics" 2>/dev/null | awk -v n="$1" '$1 == n {print $2; exit}')
    echo "${v:-?}"
}

# ---------------------------------------------------------------- wrk rounds
# run_wrk NAME URL DURATION OUTFILE LUA [WRK ARGS...]: aborts on any non-2xx.
run_wrk() {
    local name=$1 url=$2 dur=$3 out=$4 lua=$5
    shift 5
    # In the background and waited for, so a signal stops the run at once.
    taskset -c "$CLIENT_CPU" wrk "$@" -d"$dur" --latency -s "$lua" "$url" >"$out" 2>&1 &
    WRK_PID=$!
    local rc=0
    wait "$WRK_PID" || rc=$?
    WRK_PID=""
    ((rc == 0)) || die "wrk failed against $name (exit $rc): $(cat "$out")"
    # Every answer must be a 2xx: anything else measures an error path.
    if grep -q 'Non-2xx' "$out"; then
        die "$name answered errors under load: $(grep 'Non-2xx' "$out" | tr -s ' ') (see $out)"
    fi
    if grep -q 'Socket errors' "$out"; then
        log "warning: $name: $(grep 'Socket errors' "$out" | tr -s ' ')"
    fi
}
rps_of() { awk '/^Requests\/sec:/ {print $2}' "$1"; }
requests_of() { awk '/ requests in / {print $1; exit}' "$1"; }
# A wrk latency (e.g. 812.00us, 1.20ms, 1.01s) in milliseconds.
to_ms() {
    awk -v v="$1" 'BEGIN {
        n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
        if (u == "us") n /= 1000; else if (u == "s") n *= 1000; else if (u == "m") n *= 60000
        printf "%.3f", n }'
}
pct_of() { to_ms "$(awk -v p="$2" '$1 == p {print $2; exit}' "$1")"; }
median() { sort -g | awk '{a[NR] = $1} END {
    if (NR == 0) { print "nan"; exit }
    if (NR % 2) print a[(NR + 1) / 2]; else printf "%.3f\n", (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b + 0 == 0) print "n/a"; else printf "%.2f", a / b }'; }

# Share of all CPUs busy over 1 s while the servers idle: other work on the
# machine, which would skew the next round.
background_busy() {
    local a b
    a=$(head -1 /proc/stat)
    sleep 1
    b=$(head -1 /proc/stat)
    awk -v a="$a" -v b="$b" 'BEGIN {
        n = split(a, x, " "); split(b, y, " ")
        for (i = 2; i <= n && i <= 9; i++) { d = y[i] - x[i]; t += d; if (i == 5 || i == 6) idle += d }
        printf "%.0f%%", t ? 100 * (t - idle) / t : 0 }'
}

# Waits until the machine is quiet (see QUIET_PCT); sets bg to the last sample.
wait_quiet() {
    local start=$SECONDS last=-100
    while :; do
        bg=$(background_busy)
        ((${bg%\%} <= QUIET_PCT)) && return
        if ((SECONDS - start >= QUIET_WAIT)); then
            log "warning: still ${bg} busy with other work after ${QUIET_WAIT}s; running anyway"
            return
        fi
        if ((SECONDS - last >= 15)); then
            log "other work keeps the machine ${bg} busy; waiting (up to ${QUIET_WAIT}s)"
            last=$SECONDS
        fi
    done
}

# CPU ticks used so far by our processes (PIDS and their children, e.g. nginx's
# worker) and this shell's waited-for children (wrk), and by the whole machine
# (busy, total): their difference over a round is other work that competed.
our_ticks() {
    local p t=0 pids=("${PIDS[@]}")
    for p in "${PIDS[@]}"; do
        mapfile -t -O "${#pids[@]}" pids < <(pgrep -P "$p" || true)
    done
    for p in "${pids[@]}"; do
        [[ -r /proc/$p/stat ]] || continue
        # After "pid (comm) ": utime and stime are the 12th and 13th fields.
        t=$((t + $(awk '{sub(/^.*\) /, ""); print $12 + $13}' "/proc/$p/stat" 2>/dev/null || echo 0)))
    done
    # cutime and cstime: children this shell has waited for.
    echo $((t + $(awk '{sub(/^.*\) /, ""); print $14 + $15}' /proc/$$/stat)))
}
machine_ticks() { # busy total
    # busy: user nice system steal. Not irq/softirq: loopback traffic is mostly
    # softirq work done for our own processes, not always charged to them.
    head -1 /proc/stat | awk '{for (i = 2; i <= 9; i++) { t += $i; if (i <= 4 || i == 9) b += $i }; print b, t}'
}
# other_pct OURS0 BUSY0 TOTAL0 OURS1 BUSY1 TOTAL1
other_pct() {
    awk -v o0="$1" -v b0="$2" -v t0="$3" -v o1="$4" -v b1="$5" -v t1="$6" 'BEGIN {
        x = (b1 - b0) - (o1 - o0); if (x < 0) x = 0
        printf "%.0f%%", (t1 > t0) ? 100 * x / (t1 - t0) : 0 }'
}

# measured_round NAME URL DURATION OUTFILE LUA [WRK ARGS...]: one round after the
# machine is quiet, repeated while other work took more than QUIET_PCT of the
# CPUs (up to ROUND_TRIES); sets bg (before) and other (during, ! when kept anyway).
# BEFORE_TRY, when set, names a function called right before each try's wrk.
BEFORE_TRY=""
measured_round() {
    local try o0 o1 b0 b1 t0 t1
    for ((try = 1; ; try++)); do
        wait_quiet
        [[ -z "$BEFORE_TRY" ]] || "$BEFORE_TRY"
        o0=$(our_ticks)
        read -r b0 t0 < <(machine_ticks)
        run_wrk "$@"
        o1=$(our_ticks)
        read -r b1 t1 < <(machine_ticks)
        other=$(other_pct "$o0" "$b0" "$t0" "$o1" "$b1" "$t1")
        ((${other%\%} > QUIET_PCT)) || return 0
        if ((try >= ROUND_TRIES)); then
            other+="!"
            log "warning: other work took $other of the CPUs in every try; keeping the last"
            return 0
        fi
        log "other work took $other of the CPUs during the round; repeating it"
    done
}
QUIET_NOTE() {
    echo "(before, during: CPU share taken by other work on the machine, in the 1 s before the"
    echo " round with the servers idle, and during the round; rounds above ${QUIET_PCT}% were"
    echo " repeated, up to $ROUND_TRIES tries; ! marks a round kept anyway)"
}

# The report's first lines: what ran, where.
report_head() { # TITLE
    echo "$1 ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
    echo "commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet HEAD 2>/dev/null || echo ' (+ uncommitted changes)')"
    echo "cpu: $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo) x$(nproc); kernel $(uname -r)"
}
out_file() { # NAME -> bench/out/NAME-<date>.txt
    mkdir -p "$ROOT/bench/out"
    echo "$ROOT/bench/out/$1-$(date +%Y%m%d-%H%M%S).txt"
}
