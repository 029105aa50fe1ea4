#!/usr/bin/env bash
# Installs the programs the test suite starts or calls, when they are missing:
#   redis-server  (the fleet tests start real Redis servers on free loopback ports)
#   redis-sentinel (tests/fleet_topology.rs starts a Sentinel set)
#   promtool      (Debian's `prometheus` package: metrics format and alert-rule tests)
#   python3       (tests/http1.rs uploads through Python's http.client, as `requests` does;
#                  tests/examples.rs runs examples/clients/list_conversations.py)
#   node          (tests/examples.rs runs examples/clients/list_conversations.mjs; 18+)
#   javac         (a JDK, not a JRE: tests/examples.rs runs ListConversations.java as a
#                  single source file, which needs the compiler; 17+)
# Debian/Ubuntu only (apt-get); run as root or with sudo. Safe to run again: it does
# nothing when everything is there.
set -euo pipefail

# command -> Debian package
declare -A NEED=(
  [redis-server]=redis-server
  [redis-sentinel]=redis-sentinel
  [redis-cli]=redis-tools
  [promtool]=prometheus
  [python3]=python3
  [node]=nodejs
  [javac]=default-jdk-headless
)

missing=()
for cmd in "${!NEED[@]}"; do
  if ! command -v "$cmd" >/dev/null 2>&1; then
    missing+=("${NEED[$cmd]}")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else echo "test-deps: need root (or sudo) to install: ${missing[*]}" >&2; exit 1; fi
}
if ! command -v apt-get >/dev/null 2>&1; then
  echo "test-deps: missing ${missing[*]} and no apt-get to install them" >&2
  exit 1
fi
# Unique package names, sorted.
mapfile -t pkgs < <(printf '%s\n' "${missing[@]}" | sort -u)
echo "== installing test dependencies: ${pkgs[*]}"
as_root apt-get update -qq >/dev/null
as_root env DEBIAN_FRONTEND=noninteractive \
  apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
# Debian's packages start their services; the tests start their own on free ports.
for svc in redis-server prometheus; do
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$svc" 2>/dev/null; then
    as_root systemctl stop "$svc" || true
  fi
done
echo "== test dependencies installed"
