#!/usr/bin/env bash
# Memory bound benchmark: fills the gateway's page cache far past `cache.max_bytes`
# and prints the process RSS next to what the cache weighs, per phase:
#
#   realistic  REALISTIC_ACCOUNTS accounts (default 200,000) of ~3 KB pages
#   many       MANY_ACCOUNTS distinct accounts (default 1,000,000) of small pages
#   variants   VARIANTS page variants (default 50,000) of one account
#
# The upstream is `examples/page_server.rs` (answers any account, fast). Each phase
# starts a fresh gateway; RSS is read from /proc/<pid>/status (VmRSS) after the fill,
# with the cache figures from /metrics. The goal checked per phase:
#   RSS <= 1.25 x cache.max_bytes + 40 MiB
# and the script exits 1 (after all phases) if a phase is OVER it.
#
#   bench/rss.sh                      # all phases, max_bytes = 64 MiB
#   MAX_BYTES=$((32<<20)) PHASES=many bench/rss.sh
#
# Environment: MAX_BYTES (67108864), PHASES ("realistic many variants"),
# REALISTIC_ACCOUNTS, MANY_ACCOUNTS, VARIANTS, NO_BUILD=1 (skip cargo build),
# CONNECTIONS (32). Output: a table on stdout, also in bench/out/rss-<date>.txt.
# Needs: wrk, curl (installed with apt-get when missing).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
MAX_BYTES=${MAX_BYTES:-67108864}
PHASES=${PHASES:-realistic many variants}
REALISTIC_ACCOUNTS=${REALISTIC_ACCOUNTS:-200000}
MANY_ACCOUNTS=${MANY_ACCOUNTS:-1000000}
VARIANTS=${VARIANTS:-50000}
CONNECTIONS=${CONNECTIONS:-32}
BIN="$ROOT/target/release/chat-gateway"
PAGES_BIN="$ROOT/target/release/examples/page_server"

log() { printf '[rss.sh] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

for tool in wrk curl; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    log "installing $tool"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$tool" >/dev/null
  fi
done
if [[ -z "${NO_BUILD:-}" ]]; then
  log "cargo build --release (the binary and examples/page_server)"
  cargo build --release --locked --bin chat-gateway --example page_server >&2
fi
[[ -x "$BIN" && -x "$PAGES_BIN" ]] || die "build first (or unset NO_BUILD)"

TMP=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$TMP"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { for _ in $(seq 1 200); do curl -sf -o /dev/null "$1" && return 0; sleep 0.05; done; die "$1 never answered"; }
metric() { curl -s "http://127.0.0.1:$GW_PORT/metrics" | awk -v n="$1" '$1==n {print $2}'; }
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

# wrk script: every request a new account (or a new page of one account).
cat > "$TMP/fill.lua" <<'EOF'
local counter = 0
local prefix = "a"
local mode = "accounts"
function init(args)
  math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16))
  prefix = "f" .. math.random(1, 999999999)
  mode = args[1] or "accounts"
end
function request()
  counter = counter + 1
  local body
  if mode == "variants" then
    body = string.format('{"From_Account":"one_account","TimeStamp":%d}', counter)
  else
    body = string.format('{"From_Account":"%s_%d"}', prefix, counter)
  end
  return wrk.format("POST", "/v4/recentcontact/get_list", {["Content-Type"] = "application/json"}, body)
end
EOF

run_phase() {
  local phase=$1 target=$2 items=$3 mode=$4
  PAGE_PORT=$(free_port)
  "$PAGES_BIN" "127.0.0.1:$PAGE_PORT" "$items" 2>/dev/null &
  local page_pid=$!; PIDS+=("$page_pid")
  GW_PORT=$(free_port)
  cat > "$TMP/gw.toml" <<EOF
[server]
listen = "127.0.0.1:$GW_PORT"
[chat]
sdkappid = 1400000000
identifier = "administrator"
secret_key = "bench-secret"
region = "singapore"
base_url = "http://127.0.0.1:$PAGE_PORT"
[cache]
ttl_secs = 3600
stale_if_error_secs = 0
max_bytes = $MAX_BYTES
[retry]
max_attempts = 1
[ratelimit]
per_command_per_sec = 1000000
[log]
level = "warn"
EOF
  "$BIN" --config "$TMP/gw.toml" 2>"$TMP/gw-$phase.log" &
  local gw_pid=$!; PIDS+=("$gw_pid")
  wait_http "http://127.0.0.1:$GW_PORT/readyz"
  local base_kib; base_kib=$(rss_kib "$gw_pid")
  local misses=0
  while (( misses < target )); do
    wrk -t1 -c"$CONNECTIONS" -d5s -s "$TMP/fill.lua" "http://127.0.0.1:$GW_PORT" -- "$mode" >/dev/null
    misses=$(metric 'chat_gateway_cache_requests_total{result="miss"}'); misses=${misses%.*}
    log "$phase: $misses of $target filled, RSS $(( $(rss_kib "$gw_pid") / 1024 )) MiB"
  done
  local rss_kib_after; rss_kib_after=$(rss_kib "$gw_pid")
  local weighted entries pages
  weighted=$(metric chat_gateway_cache_weighted_bytes); entries=$(metric chat_gateway_cache_entries)
  pages=$(metric chat_gateway_cache_pages)
  local body_len
  body_len=$(curl -s -X POST "http://127.0.0.1:$GW_PORT/v4/recentcontact/get_list" -d '{"From_Account":"probe"}' | wc -c)
  if ! python3 - "$phase" "$misses" "$body_len" "$base_kib" "$rss_kib_after" "$weighted" "$entries" "$pages" "$MAX_BYTES" <<'EOF' | tee -a "$OUT"; then
import sys
phase, filled, body, base, rss, weighted, entries, pages, maxb = sys.argv[1:]
base, rss, maxb = int(base) * 1024, int(rss) * 1024, int(maxb)
weighted, entries, pages, filled = float(weighted), float(entries), float(pages), int(filled)
limit = 1.25 * maxb + 40 * 2**20
mib = lambda b: b / 2**20
print(f"| {phase} | {filled:,} | {int(body):,} B | {mib(weighted):.1f} MiB | {int(entries):,} | {int(pages):,} | "
      f"{mib(rss):.1f} MiB | {(rss - base) / max(pages, 1):,.0f} B | {weighted / max(pages, 1):,.0f} B | "
      f"{mib(limit):.1f} MiB | {'ok' if rss <= limit else 'OVER'} |")
sys.exit(0 if rss <= limit else 3)
EOF
    OVER+=("$phase")
  fi
  kill "$gw_pid" "$page_pid" 2>/dev/null || true
  wait "$gw_pid" "$page_pid" 2>/dev/null || true
}

mkdir -p bench/out
OVER=()
OUT="bench/out/rss-$(date +%Y%m%d-%H%M%S).txt"
{
  echo "cache.max_bytes = $MAX_BYTES ($(( MAX_BYTES >> 20 )) MiB), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo
  echo "| phase | pages offered | page body | weighed | entries | pages cached | RSS | RSS per cached page (over start) | weight per page | goal: RSS <= | |"
  echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
} | tee "$OUT"
for phase in $PHASES; do
  case $phase in
    realistic) run_phase realistic "$REALISTIC_ACCOUNTS" 20 accounts ;;
    many) run_phase many "$MANY_ACCOUNTS" 2 accounts ;;
    variants) run_phase variants "$VARIANTS" 20 variants ;;
    *) die "unknown phase $phase" ;;
  esac
done
log "written to $OUT"
if (( ${#OVER[@]} )); then
  log "OVER the memory goal (RSS <= 1.25 x max_bytes + 40 MiB) in: ${OVER[*]}"
  exit 1
fi
