"""Cross-checks deploy/kubernetes/*.yaml for what schema validation cannot see.

For every workload whose pod runs a container named `chat-gateway`, with the
gateway config taken from the ConfigMap mounted at its --config path:

- server.listen is on loopback (the API holds the app's admin credentials);
- with server.admin_listen: a container port named `admin` with its port number,
  httpGet probes on it, and prometheus.io/port (when the pod has
  prometheus.io/scrape) naming it; without it: no httpGet probes (the kubelet
  cannot reach a loopback listener);
- with server.callback_listen: callback.token or callback.token_file set, a
  container port named `callback` with its number, and a Service selecting the
  pod with that target port (by number when the gateway is a native sidecar: a
  named target port on an init container resolves only from Kubernetes 1.32);
- every `*_file` path in the config is a file the pod mounts: a directory mount
  (no subPath, which never sees Secret updates) of a Secret or ConfigMap that
  holds that key;
- with a [redis] section: redis.expected_gateways equals the workload's replicas
  (each gateway's share of the rate limit without Redis);
- every PodMonitor selects at least one such pod and names a port it declares.

Usage: python3 check_manifests.py DIR    (exit status 1 on any problem)
Needs PyYAML, and tomllib (Python 3.11+) or tomli.
"""

import pathlib
import posixpath
import sys

import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet")
PROBES = ("startupProbe", "livenessProbe", "readinessProbe")


def port_of(addr):
    return int(addr.rsplit(":", 1)[1])


def is_loopback(addr):
    host = addr.rsplit(":", 1)[0].strip("[]")
    return host == "localhost" or host.startswith("127.") or host == "::1"


def file_paths(cfg, prefix=""):
    """(dotted key, path) for every `*_file` string in the config."""
    for k, v in cfg.items():
        if isinstance(v, dict):
            yield from file_paths(v, f"{prefix}{k}.")
        elif k.endswith("_file") and isinstance(v, str):
            yield f"{prefix}{k}", v


def main(directory):
    docs = []
    for f in sorted(pathlib.Path(directory).glob("*.yaml")):
        for d in yaml.safe_load_all(f.read_text()):
            if d:
                docs.append((f.name, d))
    by_kind = {}
    for fname, d in docs:
        by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = (fname, d)

    problems, report = [], []
    pods = []  # (where, labels, pod spec, gateway container or None)
    for fname, d in docs:
        if d["kind"] not in WORKLOADS:
            continue
        t = d["spec"]["template"]
        spec = t["spec"]
        where = f"{fname} {d['kind']}/{d['metadata']['name']}"
        labels = t["metadata"].get("labels", {})
        ann = t["metadata"].get("annotations", {})
        inits = spec.get("initContainers", [])
        gw = next((c for c in inits + spec.get("containers", []) if c["name"] == "chat-gateway"), None)
        pods.append((where, labels, spec, gw))
        if gw is None:
            continue

        def problem(msg):
            problems.append(f"{where}: {msg}")

        sidecar = any(c is gw for c in inits) and gw.get("restartPolicy") == "Always"
        ports = {p.get("name"): p["containerPort"] for p in gw.get("ports", [])}
        mounts = gw.get("volumeMounts", [])
        volumes = {v["name"]: v for v in spec.get("volumes", [])}

        def mounted_files(directory_path):
            """The file names a directory mount at `directory_path` provides."""
            for m in mounts:
                if m["mountPath"].rstrip("/") != directory_path.rstrip("/"):
                    continue
                if m.get("subPath"):
                    problem(f"{m['mountPath']} is a subPath mount: it never sees updates")
                    return set()
                v = volumes.get(m["name"], {})
                for kind, ref, key in (("Secret", "secret", "secretName"), ("ConfigMap", "configMap", "name")):
                    if ref not in v:
                        continue
                    if v[ref].get("items"):
                        return {i["path"] for i in v[ref]["items"]}
                    obj = by_kind.get(kind, {}).get(v[ref][key])
                    if obj is None:  # created out of band: trust the mount
                        return None
                    d = obj[1]
                    return set(d.get("data") or {}) | set(d.get("stringData") or {})
            problem(f"nothing is mounted at {directory_path}")
            return set()

        args = gw.get("args", [])
        if "--config" not in args:
            problem("no --config argument")
            continue
        cfg_path = args[args.index("--config") + 1]
        cfg_dir, cfg_name = posixpath.split(cfg_path)
        cm_mount = next((m for m in mounts if m["mountPath"].rstrip("/") == cfg_dir), None)
        cm_ref = volumes.get(cm_mount["name"], {}).get("configMap") if cm_mount else None
        if not cm_ref or cm_ref["name"] not in by_kind.get("ConfigMap", {}):
            problem(f"{cfg_path} is not a ConfigMap defined here")
            continue
        cm_file, cm = by_kind["ConfigMap"][cm_ref["name"]]
        try:
            cfg = tomllib.loads(cm["data"][cfg_name])
        except (KeyError, tomllib.TOMLDecodeError) as e:
            problem(f"ConfigMap {cm_ref['name']} ({cm_file}) key {cfg_name}: {e}")
            continue
        server = cfg.get("server", {})
        facts = [f"config from ConfigMap {cm_ref['name']} ({cm_file})"]

        redis = cfg.get("redis")
        replicas = d["spec"].get("replicas", 1) if d["kind"] in ("Deployment", "StatefulSet") else None
        if redis is not None and replicas is not None:
            expected = redis.get("expected_gateways", 1)
            if expected != replicas:
                problem(f"redis.expected_gateways is {expected}, the replicas {replicas}")
            else:
                facts.append(f"redis.expected_gateways = replicas = {replicas}")

        listen = server.get("listen", "127.0.0.1:8080")
        if not is_loopback(listen) and not server.get("auth_tokens") and not server.get("auth_tokens_file"):
            problem(f"server.listen {listen} is not loopback and has no caller tokens")

        admin = server.get("admin_listen")
        for probe in PROBES:
            p = gw.get(probe)
            if p is None:
                continue
            if admin is None and "httpGet" in p:
                problem(f"{probe} is httpGet but there is no server.admin_listen")
            if admin is not None:
                if "httpGet" not in p:
                    problem(f"{probe} should be an httpGet probe on the admin port")
                elif p["httpGet"].get("port") not in ("admin", port_of(admin)):
                    problem(f"{probe} probes port {p['httpGet'].get('port')}, not the admin port")
                elif p["httpGet"].get("path") not in ("/healthz", "/readyz"):
                    problem(f"{probe} probes {p['httpGet'].get('path')}, not /healthz or /readyz")
        if admin is not None:
            ap = port_of(admin)
            if ports.get("admin") != ap:
                problem(f"server.admin_listen is port {ap}, container port 'admin' is {ports.get('admin')}")
            if ann.get("prometheus.io/scrape") == "true":
                if ann.get("prometheus.io/port") != str(ap):
                    problem(f"prometheus.io/port is {ann.get('prometheus.io/port')}, admin port is {ap}")
                if ann.get("prometheus.io/path", "/metrics") != "/metrics":
                    problem("prometheus.io/path is not /metrics")
            facts.append(f"admin {ap}: {', '.join(p for p in PROBES if p in gw)}"
                         + (", prometheus.io annotations" if "prometheus.io/port" in ann else ""))

        callback = server.get("callback_listen")
        if callback is not None:
            cp = port_of(callback)
            cb = cfg.get("callback", {})
            if not is_loopback(callback) and not (cb.get("token") or cb.get("token_file")):
                problem("a non-loopback callback_listen needs callback.token or callback.token_file")
            if ports.get("callback") != cp:
                problem(f"server.callback_listen is port {cp}, container port 'callback' is {ports.get('callback')}")
            services = []
            for name, (sfile, svc) in by_kind.get("Service", {}).items():
                sel = svc["spec"].get("selector") or {}
                if not sel or not sel.items() <= labels.items():
                    continue
                for sp in svc["spec"].get("ports", []):
                    tp = sp.get("targetPort", sp["port"])
                    if tp == cp:
                        services.append(f"Service {name} :{sp['port']} -> {cp}")
                    elif tp == "callback":
                        if sidecar:
                            problem(f"Service {name} targets the named port 'callback' of a native sidecar: "
                                    "resolved only from Kubernetes 1.32; use the number")
                        services.append(f"Service {name} :{sp['port']} -> callback")
            if not services:
                problem(f"no Service selecting the pod targets the callback port {cp}")
            facts.append(f"callback {cp}: {'; '.join(services)}")

        files = []
        for key, path in file_paths(cfg):
            d, name = posixpath.split(path)
            provided = mounted_files(d)
            if provided is not None and name not in provided:
                problem(f"{key} = {path}, but the volume mounted at {d} has no key {name!r}")
            files.append(name)
        if files:
            facts.append(f"files mounted: {', '.join(files)}")
        report.append(f"{where}: " + "; ".join(facts))

    for name, (fname, pm) in by_kind.get("PodMonitor", {}).items():
        sel = pm["spec"]["selector"].get("matchLabels", {})
        matched = [(w, spec) for w, labels, spec, gw in pods if gw is not None and sel.items() <= labels.items()]
        if not matched:
            problems.append(f"{fname} PodMonitor/{name}: selects no pod running the gateway")
        for ep in pm["spec"].get("podMetricsEndpoints", []):
            for w, spec in matched:
                names = {p.get("name") for c in spec.get("initContainers", []) + spec["containers"]
                         for p in c.get("ports", [])}
                if ep.get("port") not in names:
                    problems.append(f"{fname} PodMonitor/{name}: {w} has no port named {ep.get('port')!r}")
        report.append(f"{fname} PodMonitor/{name}: port {', '.join(str(e.get('port')) for e in pm['spec'].get('podMetricsEndpoints', []))}"
                      f" of {', '.join(w for w, _ in matched)}")

    for line in report:
        print(f"  {line}")
    for p in problems:
        print(f"  PROBLEM {p}")
    if not report:
        print("  PROBLEM no workload runs a chat-gateway container")
        return 1
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "deploy/kubernetes"))
