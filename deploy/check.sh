#!/usr/bin/env bash
# Validates everything under deploy/, the way deploy/README.md describes. One command,
# from anywhere:
#
#     bash deploy/check.sh
#
# Steps (each prints what it checked; the last line counts them):
#   1. yamllint --strict with deploy/.yamllint, on every YAML file under deploy/.
#   2. kubernetes-validate --strict (the Kubernetes OpenAPI schemas, unknown fields
#      rejected) on the built-in kinds in deploy/kubernetes/, for each version in
#      K8S_VERSIONS; plus the native-sidecar boundary: 1.27's schema must reject
#      `restartPolicy` on an init container, 1.28's must accept it.
#   3. The PodMonitor(s) against the prometheus-operator CRD schema packaged as
#      @kubernetes-models/prometheus-operator (npm): field types, patterns and
#      required fields (that schema does not reject unknown fields).
#   4. deploy/check_manifests.py: ports, probes, annotations, Services, mounted files
#      and PodMonitor selectors agree with each gateway config.
#   5. `chat-gateway check-config` on each gateway config in the manifests (and
#      config/systemd.example.toml, which the systemd unit uses), with the secret
#      files they name replaced by dummies. Needs a built binary: CHAT_GATEWAY_BIN,
#      or target/release/chat-gateway or target/debug/chat-gateway, whichever is
#      newer; skipped (and said so) without one.
#   6. systemd-analyze verify and `security --offline` (exposure at most
#      SYSTEMD_MAX_EXPOSURE) on deploy/systemd/chat-gateway.service, and its
#      Documentation= files created by the install steps in its header. Skipped
#      (and said so) where systemd-analyze is missing.
#
# Tools: yamllint, python3 (with venv), node and npm; kubernetes-validate and the
# npm package are installed on first use into $CHECK_CACHE (default
# ~/.cache/chat-gateway-deploy-check), pinned below.
# Exit status: 0 when nothing failed, 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

K8S_VERSIONS="1.29 1.30 1.31 1.32 1.33 1.34 1.35 1.36 1.37"
KUBERNETES_VALIDATE_VERSION=1.37.0
PROMETHEUS_OPERATOR_MODELS_VERSION=6.0.0
SYSTEMD_MAX_EXPOSURE=2.0
CHECK_CACHE="${CHECK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/chat-gateway-deploy-check}"

passed=0
failed=0
skipped=0
step() { printf '\n== %s\n' "$*"; }
pass() { echo "ok: $*"; passed=$((passed + 1)); }
fail() { echo "FAILED: $*"; failed=$((failed + 1)); }
skip() { echo "SKIPPED: $*"; skipped=$((skipped + 1)); }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# Kubernetes manifests of built-in kinds, and those of CRDs.
builtin=()
crd=()
for f in deploy/kubernetes/*.yaml; do
  if grep -q '^apiVersion: monitoring.coreos.com/' "$f"; then crd+=("$f"); else builtin+=("$f"); fi
done

# ---------------------------------------------------------------- 1. yamllint
step "1. yamllint --strict -c deploy/.yamllint deploy/"
if ! command -v yamllint >/dev/null 2>&1; then
  fail "yamllint not found (Debian: apt-get install yamllint; or pip install yamllint)"
else
  mapfile -t yaml_files < <(find deploy -name '*.yaml' -o -name '*.yml' | sort)
  if yamllint --strict -c deploy/.yamllint deploy/; then
    pass "yamllint $(yamllint --version | cut -d' ' -f2): ${#yaml_files[@]} files clean: ${yaml_files[*]}"
  else
    fail "yamllint"
  fi
fi

# ------------------------------------------------ a Python venv for steps 2 and 4
venv="$CHECK_CACHE/venv-kubernetes-validate-$KUBERNETES_VALIDATE_VERSION"
if [ ! -x "$venv/bin/kubernetes-validate" ]; then
  echo "(installing kubernetes-validate==$KUBERNETES_VALIDATE_VERSION into $venv)"
  rm -rf "$venv"
  python3 -m venv "$venv" &&
    "$venv/bin/pip" install -q "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" \
      "tomli; python_version < '3.11'" ||
    echo "could not install kubernetes-validate"
fi
kv="$venv/bin/kubernetes-validate"
py="$venv/bin/python"

# ------------------------------------------------------ 2. kubernetes-validate
step "2. kubernetes-validate --strict: ${builtin[*]}"
if [ ! -x "$kv" ]; then
  fail "kubernetes-validate is not installed"
else
  for v in $K8S_VERSIONS; do
    out=$("$kv" --strict -k "$v" "${builtin[@]}" 2>&1)
    rc=$?
    n=$(grep -c ' passed for resource ' <<<"$out")
    other=$(grep -v ' passed for resource ' <<<"$out")
    if [ $rc -eq 0 ] && [ -z "$other" ]; then
      pass "Kubernetes $v: $n resources valid"
    else
      echo "$other"
      fail "Kubernetes $v (exit $rc)"
    fi
  done
  # The boundary of native sidecars, as the schemas draw it.
  out=$("$kv" --strict -k 1.27 deploy/kubernetes/sidecar.yaml 2>&1)
  if grep -q "initContainers.0: Additional properties are not allowed ('restartPolicy' was unexpected)" <<<"$out"; then
    pass "Kubernetes 1.27: rejects restartPolicy on an init container (no native sidecars)"
  else
    echo "$out"
    fail "Kubernetes 1.27 was expected to reject restartPolicy on an init container"
  fi
  if "$kv" --strict --quiet -k 1.28 deploy/kubernetes/sidecar.yaml; then
    pass "Kubernetes 1.28: accepts it (the field exists from 1.28 on; a schema cannot show feature gates)"
  else
    fail "Kubernetes 1.28 was expected to accept restartPolicy on an init container"
  fi
fi

# -------------------------------------------------------- 3. PodMonitor schema
step "3. prometheus-operator CRD schema: ${crd[*]:-(none)}"
if [ ${#crd[@]} -eq 0 ]; then
  skip "no CRD manifests"
elif ! command -v npm >/dev/null 2>&1 || ! command -v node >/dev/null 2>&1; then
  fail "node and npm are needed to validate ${crd[*]}"
else
  models="$CHECK_CACHE/npm-prometheus-operator-$PROMETHEUS_OPERATOR_MODELS_VERSION"
  pkg="$models/node_modules/@kubernetes-models/prometheus-operator"
  if [ ! -d "$pkg" ]; then
    echo "(installing @kubernetes-models/prometheus-operator@$PROMETHEUS_OPERATOR_MODELS_VERSION into $models)"
    mkdir -p "$models"
    npm install --prefix "$models" --no-audit --no-fund --silent \
      "@kubernetes-models/prometheus-operator@$PROMETHEUS_OPERATOR_MODELS_VERSION" ||
      echo "could not install the npm package"
  fi
  if [ ! -d "$pkg" ] || [ ! -x "$py" ]; then
    fail "the schema package or the Python venv is missing"
  else
    # YAML -> one JSON document per line, validated by the package's models.
    # shellcheck disable=SC2016  # JavaScript, not shell
    validate_js='
      import { pathToFileURL } from "node:url";
      import { createInterface } from "node:readline";
      const base = process.env.PKG + "/monitoring.coreos.com/v1/";
      let bad = 0, n = 0;
      for await (const line of createInterface({ input: process.stdin })) {
        const { file, doc } = JSON.parse(line);
        const where = `${file}: ${doc.kind}/${doc.metadata?.name}`;
        if (doc.apiVersion !== "monitoring.coreos.com/v1") { console.log(`${where}: unexpected apiVersion ${doc.apiVersion}`); bad++; continue; }
        let Model;
        try { Model = (await import(pathToFileURL(base + doc.kind + ".js")))[doc.kind]; }
        catch { console.log(`${where}: no schema for kind ${doc.kind}`); bad++; continue; }
        try { new Model(doc).validate(); n++; console.log(`${where}: valid`); }
        catch (e) { console.log(`${where}: ${e.message}`); bad++; }
      }
      process.exit(bad || n === 0 ? 1 : 0);'
    if "$py" -c 'import json, sys, yaml
for f in sys.argv[1:]:
    for d in yaml.safe_load_all(open(f)):
        if d:
            print(json.dumps({"file": f, "doc": d}))' "${crd[@]}" |
      PKG="$pkg" node --input-type=module -e "$validate_js"; then
      pass "CRD objects valid (@kubernetes-models/prometheus-operator $PROMETHEUS_OPERATOR_MODELS_VERSION)"
    else
      fail "CRD schema validation"
    fi
  fi
fi

# ---------------------------------------------------- 4. manifests cross-check
step "4. deploy/check_manifests.py deploy/kubernetes"
if [ ! -x "$py" ]; then
  fail "the Python venv (PyYAML) is missing"
elif "$py" deploy/check_manifests.py deploy/kubernetes; then
  pass "ports, probes, annotations, Services, mounted files and PodMonitor selectors agree with the gateway configs"
else
  fail "manifest cross-check"
fi

# ------------------------------------------------------------ 5. check-config
step "5. chat-gateway check-config on the deployed configs"
bin="${CHAT_GATEWAY_BIN:-}"
if [ -z "$bin" ]; then
  for b in target/release/chat-gateway target/debug/chat-gateway; do
    if [ -x "$b" ] && { [ -z "$bin" ] || [ "$b" -nt "$bin" ]; }; then bin=$b; fi
  done
fi
if [ -z "$bin" ] || [ ! -x "$bin" ]; then
  skip "no chat-gateway binary (build one, or set CHAT_GATEWAY_BIN)"
elif [ ! -x "$py" ]; then
  fail "the Python venv (PyYAML) is missing"
else
  echo "binary: $bin ($("$bin" --version 2>/dev/null))"
  # Every config.toml of a ConfigMap, written out with the /etc/chat-gateway/ file
  # paths it names pointed at dummy files in $tmp.
  if ! "$py" - "$tmp" "${builtin[@]}" <<'EOF'
import pathlib, re, sys, yaml
out = pathlib.Path(sys.argv[1])
sources = [("config/systemd.example.toml", pathlib.Path("config/systemd.example.toml").read_text())]
for f in sys.argv[2:]:
    for d in yaml.safe_load_all(open(f)):
        if d and d["kind"] == "ConfigMap":
            for key, text in (d.get("data") or {}).items():
                if key.endswith(".toml"):
                    sources.append((f"{f} ConfigMap/{d['metadata']['name']} {key}", text))
dummies = out / "files"
dummies.mkdir()
for i, (name, text) in enumerate(sources):
    def dummy(m):
        p = dummies / m.group(1).replace("/", "_")
        p.write_text("dummy-value-for-check-config-0123456789\n")
        return f'"{p}"'
    text = re.sub(r'"/etc/chat-gateway/([^"]+)"', dummy, text)
    (out / f"{i}.toml").write_text(text)
    (out / f"{i}.name").write_text(name)
EOF
  then
    fail "could not extract the configs"
  else
    for cfg in "$tmp"/*.toml; do
      name=$(cat "${cfg%.toml}.name")
      # Without the caller's CHAT_GATEWAY* variables (they would override the file).
      # shellcheck disable=SC2046
      if out=$(env $(compgen -e | grep '^CHAT_GATEWAY' | sed 's/^/-u /') \
        "$bin" check-config --config "$cfg" 2>&1); then
        pass "check-config: $name"
      else
        echo "$out" | tail -5
        fail "check-config: $name"
      fi
    done
  fi
fi

# ------------------------------------------------------------------ 6. systemd
unit=deploy/systemd/chat-gateway.service
step "6. systemd: $unit"
if ! command -v systemd-analyze >/dev/null 2>&1; then
  skip "systemd-analyze not found (Debian: the systemd package)"
else
  # verify checks that ExecStart= is executable here; before installation point
  # a copy at a stand-in (only that path differs).
  copy="$tmp/chat-gateway.service"
  exe=$(sed -n 's/^ExecStart=\([^ ]*\).*/\1/p' "$unit")
  if [ -x "$exe" ]; then
    cp "$unit" "$copy"
    note=""
  else
    printf '#!/bin/sh\n' >"$tmp/chat-gateway-stand-in"
    chmod 0755 "$tmp/chat-gateway-stand-in"
    sed "s#^ExecStart=$exe#ExecStart=$tmp/chat-gateway-stand-in#" "$unit" >"$copy"
    note=" (ExecStart=$exe is not installed here: checked with a stand-in executable)"
  fi
  if out=$(systemd-analyze verify "$copy" 2>&1) && [ -z "$out" ]; then
    pass "systemd-analyze verify: no findings$note"
  else
    echo "$out"
    fail "systemd-analyze verify"
  fi
  threshold=$(awk -v e="$SYSTEMD_MAX_EXPOSURE" 'BEGIN { printf "%d", e * 10 }')
  if out=$(systemd-analyze security --offline=true --threshold="$threshold" "$copy" 2>&1); then
    pass "systemd-analyze security: $(grep -o 'Overall exposure level.*' <<<"$out" | sed 's/ [^ ]*$//') (at most $SYSTEMD_MAX_EXPOSURE)"
  else
    grep -o 'Overall exposure level.*' <<<"$out" || echo "$out" | tail -3
    fail "systemd-analyze security over $SYSTEMD_MAX_EXPOSURE"
  fi
  missing=""
  # shellcheck disable=SC2013  # Documentation= takes space-separated URIs
  for doc in $(sed -n 's#^Documentation=##p' "$unit"); do
    case "$doc" in
      file://*)
        path=${doc#file://}
        grep -Eq "^#[[:space:]]+install .*[[:space:]]$path([[:space:]]|\$)" "$unit" || missing="$missing $path"
        ;;
    esac
  done
  if [ -z "$missing" ]; then
    pass "every Documentation= file is created by the unit's install steps"
  else
    fail "Documentation= files no install step creates:$missing"
  fi
  systemd-analyze --version | head -1
fi

printf '\n%s passed, %s failed, %s skipped\n' "$passed" "$failed" "$skipped"
[ "$failed" -eq 0 ]
