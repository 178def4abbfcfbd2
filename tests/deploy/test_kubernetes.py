"""deploy/k8s: both overlays rendered offline with `kubectl kustomize` and checked against the code they deploy.

- the rendered objects pass the Kubernetes API schema (kubernetes-validate, strict) and a policy scan (checkov,
  with the accepted skips below, each with its reason);
- the probes hit routes the service has; ports equal the Dockerfile's EXPOSE and the service's port setting;
  images are the Dockerfile targets compose builds; every environment variable of the serve container is a
  setting of service/settings.py (and the whole environment parses as Settings); the trainer's are read by
  docker/trainer.sh or the code;
- the rolling update keeps capacity (maxUnavailable 0) and the grace period outlasts preStop + drain + the
  in-flight timeout; CPUs = workers x onnxruntime threads; the security context is non-root, read-only, no
  capabilities; the Service, HPA, PDB and NetworkPolicy select the serve pods; the model repository is the PVC.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.test_containers import installed_extras, parse_dockerfile

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu")
SERVE_TARGET = {"cpu": "serve-cpu", "gpu": "serve-gpu"}
KUBERNETES_VERSION = "1.30.0"  # the API version the objects are checked against (autoscaling/v2, policy/v1: >= 1.23)

# checkov checks that do not fit this deployment, and why.
ACCEPTED_SKIPS = {
    "CKV_K8S_35": "secrets as environment variables: the service reads REDIS_URL and UDG_ADMIN_TOKEN from its "
                  "environment (pydantic-settings), like in compose; the Secret is referenced, never inlined",
    "CKV_K8S_43": "image digests: the images are built from this repository and tagged by Dockerfile target; pin "
                  "digests per deployment with kustomize `images: [{name: udg-ctr, digest: ...}]` (docs/kubernetes.md)",
}


def kubectl() -> str:
    path = shutil.which("kubectl")
    assert path, "kubectl not found: install Debian's kubernetes-client (.ci/run does)"
    return path


@pytest.fixture(scope="module")
def renders(tmp_path_factory) -> dict[str, tuple[list[dict], Path]]:
    """overlay -> (its objects, the rendered file)."""
    out = {}
    for overlay in OVERLAYS:
        result = subprocess.run([kubectl(), "kustomize", str(K8S / "overlays" / overlay)], capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        path = tmp_path_factory.mktemp("k8s") / f"{overlay}.yaml"
        path.write_text(result.stdout)
        out[overlay] = ([d for d in yaml.safe_load_all(result.stdout) if d], path)
    return out


@pytest.fixture(params=OVERLAYS)
def rendered(request, renders) -> tuple[str, list[dict], Path]:
    return request.param, *renders[request.param]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{kind} {name or ''}: {len(found)} objects"
    return found[0]


def serve_pod(docs):
    return one(docs, "Deployment")["spec"]["template"]


def container(pod: dict, name: str) -> dict:
    return next(c for c in pod["spec"]["containers"] if c["name"] == name)


def config_map(docs) -> dict[str, str]:
    return one(docs, "ConfigMap")["data"]


def environment(docs, c: dict) -> dict[str, str]:
    """The container's environment as the pod gets it: envFrom ConfigMaps, then env (secrets: placeholders)."""
    env: dict[str, str] = {}
    maps = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
    for source in c.get("envFrom", []):
        env.update(maps[source["configMapRef"]["name"]])
    for var in c.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "configMapKeyRef" in var["valueFrom"]:
            ref = var["valueFrom"]["configMapKeyRef"]
            env[var["name"]] = maps[ref["name"]][ref["key"]]
        else:
            env[var["name"]] = {"REDIS_URL": "redis://redis.example:6379/0"}.get(var["name"], "secret-placeholder")
    return env


def settings_env_names() -> set[str]:
    from service.settings import Settings

    names = set()
    for name, info in Settings.model_fields.items():
        alias = info.validation_alias
        names |= set(alias.choices) if alias is not None else {"UDG_" + name.upper()}
    return names


def dockerfile_stages():
    return parse_dockerfile((ROOT / "Dockerfile").read_text())[1]


def compose_images() -> dict[str, str]:
    """Build target -> image name, from docker-compose.yml."""
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    return {s["build"]["target"]: s["image"] for s in services.values() if "build" in s}


def service_routes() -> set[str]:
    from service.main import create_app
    from service.settings import Settings

    app = create_app(Settings(redis_url="redis://127.0.0.1:1/0", model_repo=ROOT / "no-such-repo"))
    return set(app.openapi()["paths"])  # the service's OpenAPI document


def probe_port(c: dict, probe: dict) -> int:
    port = probe["httpGet"]["port"]
    return port if isinstance(port, int) else next(p["containerPort"] for p in c["ports"] if p["name"] == port)


# --- the tests ------------------------------------------------------------------------------------------------

def test_every_piece_is_there(rendered):
    _, docs, _ = rendered
    kinds = sorted(d["kind"] for d in docs)
    for kind in ("Namespace", "ServiceAccount", "ConfigMap", "PersistentVolumeClaim", "Deployment", "Service",
                 "HorizontalPodAutoscaler", "PodDisruptionBudget", "Job"):
        assert kind in kinds, kinds
    assert kinds.count("NetworkPolicy") == 2  # serve and trainer
    assert not [d for d in docs if d["kind"] == "Secret"], "secrets are created apart, never rendered from here"
    namespaced = [d for d in docs if d["kind"] != "Namespace"]
    assert {d["metadata"].get("namespace") for d in namespaced} == {one(docs, "Namespace")["metadata"]["name"]}


def test_probes_ports_and_images_match_the_service_and_the_dockerfile(rendered):
    overlay, docs, _ = rendered
    pod = serve_pod(docs)
    serve = container(pod, "serve")
    routes = service_routes()
    assert serve["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert serve["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert serve[kind]["httpGet"]["path"] in routes, (kind, sorted(routes))
    stages = dockerfile_stages()
    target = SERVE_TARGET[overlay]
    exposed = {int(port) for port in stages[target].args("EXPOSE")}
    env = environment(docs, serve)
    from service.settings import Settings

    assert [p["containerPort"] for p in serve["ports"]] == sorted(exposed) == [int(env["UDG_PORT"])]
    assert Settings.model_fields["port"].default in exposed  # `udg serve` outside a container: the same port
    for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert probe_port(serve, serve[kind]) in exposed
    service = one(docs, "Service")
    assert [probe_port(serve, {"httpGet": {"port": p["targetPort"]}}) for p in service["spec"]["ports"]] == \
        sorted(exposed)
    images = compose_images()
    assert serve["image"] == images[target]
    trainer = container(one(docs, "Job")["spec"]["template"], "trainer")
    assert trainer["image"] == images["trainer"] and "trainer" in stages
    uid = {stage: stages[stage].args("USER")[-1].split(":")[0] for stage in (target, "trainer")}
    for pod_spec in (pod, one(docs, "Job")["spec"]["template"]):
        assert str(pod_spec["spec"]["securityContext"]["runAsUser"]) == uid[target] == uid["trainer"]


def test_environment_is_made_of_real_settings(rendered, monkeypatch):
    _, docs, _ = rendered
    serve_env = environment(docs, container(serve_pod(docs), "serve"))
    unknown = set(serve_env) - settings_env_names()
    assert not unknown, f"not settings of service/settings.py: {sorted(unknown)}"
    for name in list(__import__("os").environ):
        if name.startswith("UDG_") or name == "REDIS_URL":
            monkeypatch.delenv(name)
    for name, value in serve_env.items():
        monkeypatch.setenv(name, value)
    from service.settings import Settings

    settings = Settings(_env_file=None)  # every value parses
    assert str(settings.model_repo) == "/models" and settings.port == 8000
    # the trainer's variables: docker/trainer.sh reads them, or the code does
    trainer_env = environment(docs, container(one(docs, "Job")["spec"]["template"], "trainer"))
    script = (ROOT / "docker" / "trainer.sh").read_text()
    code = "".join(p.read_text() for d in ("dataset", "pipeline", "service") for p in (ROOT / d).rglob("*.py"))
    for name in trainer_env:
        assert name in script or f'"{name}"' in code or name in settings_env_names(), name


def test_rolling_update_and_graceful_shutdown_budget(rendered):
    _, docs, _ = rendered
    deployment = one(docs, "Deployment")
    rolling = deployment["spec"]["strategy"]["rollingUpdate"]
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    assert rolling["maxUnavailable"] == 0 and int(str(rolling["maxSurge"]).rstrip("%")) >= 1
    pod = serve_pod(docs)
    serve = container(pod, "serve")
    env = environment(docs, serve)
    command = serve["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    drain, in_flight = float(env["UDG_SHUTDOWN_DRAIN_S"]), float(env["UDG_SHUTDOWN_TIMEOUT_S"])
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert drain > 0 and pre_stop > 0
    assert grace > pre_stop + drain + in_flight, (grace, pre_stop, drain, in_flight)
    # readiness notices the drain while it lasts: probe period x threshold within the drain
    readiness = serve["readinessProbe"]
    assert readiness["periodSeconds"] * readiness["failureThreshold"] < drain


def test_resources_match_workers_times_onnxruntime_threads(rendered):
    overlay, docs, _ = rendered
    serve = container(serve_pod(docs), "serve")
    env = environment(docs, serve)
    cpus = int(env["UDG_WORKERS"]) * int(env["UDG_ORT_THREADS"])
    resources = serve["resources"]
    assert float(resources["requests"]["cpu"]) == float(resources["limits"]["cpu"]) == cpus
    assert resources["requests"]["memory"] == resources["limits"]["memory"]  # Guaranteed QoS
    gpus = resources["limits"].get("nvidia.com/gpu")
    if overlay == "gpu":
        assert gpus == 1 and env["UDG_ORT_PROVIDERS"].split(",")[0] == "CUDAExecutionProvider"
    else:
        assert gpus is None and env["UDG_ORT_PROVIDERS"] == "CPUExecutionProvider"
        assert "nvidia.com/gpu" not in json.dumps(docs)


def test_security_context_and_volumes(rendered):
    _, docs, _ = rendered
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    model_repo = config_map(docs)["UDG_MODEL_REPO"]
    for pod, name, writes_models in ((serve_pod(docs), "serve", False),
                                     (one(docs, "Job")["spec"]["template"], "trainer", True)):
        spec = pod["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["automountServiceAccountToken"] is False
        c = container(pod, name)
        context = c["securityContext"]
        assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        assert "/tmp" in mounts and "emptyDir" in volumes[mounts["/tmp"]["name"]]  # a writable /tmp
        repo = volumes[mounts[model_repo]["name"]]
        assert repo["persistentVolumeClaim"]["claimName"] in claims
        assert mounts[model_repo].get("readOnly", False) is not writes_models
    # compose mounts the same repository at the same place
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert "model-repo:/models:ro" in compose["service"]["volumes"] and model_repo == "/models"
    routing = config_map(docs)["UDG_ROUTING_FILE"]
    assert any(routing.startswith(path + "/") for path in
               {m["mountPath"] for m in container(serve_pod(docs), "serve")["volumeMounts"]} - {model_repo})


def test_selectors_reach_the_serve_pods(rendered):
    _, docs, _ = rendered
    labels = serve_pod(docs)["metadata"]["labels"]

    def selects(selector: dict) -> bool:
        return all(labels.get(k) == v for k, v in selector.items())

    assert selects(one(docs, "Service")["spec"]["selector"])
    assert selects(one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"])
    assert selects(one(docs, "NetworkPolicy", "udg-ctr-serve")["spec"]["podSelector"]["matchLabels"])
    hpa = one(docs, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"]["name"] == one(docs, "Deployment")["metadata"]["name"]
    assert one(docs, "PodDisruptionBudget")["spec"]["maxUnavailable"] < hpa["minReplicas"] <= hpa["maxReplicas"]
    ingress = one(docs, "NetworkPolicy", "udg-ctr-serve")["spec"]["ingress"]
    assert [p["port"] for rule in ingress for p in rule["ports"]] == [8000]
    secrets = {v["name"]: v["valueFrom"]["secretKeyRef"] for v in container(serve_pod(docs), "serve")["env"]
               if "secretKeyRef" in v.get("valueFrom", {})}
    assert set(secrets) == {"REDIS_URL", "UDG_ADMIN_TOKEN"} and secrets["UDG_ADMIN_TOKEN"]["optional"] is True


OTLP_HTTP_PORT = 4318  # the OTLP/HTTP collector port (service/tracing.py)


def test_tracing_is_off_by_default_and_reachable_when_set(rendered):
    """The serve image has the OpenTelemetry SDK (test_containers), so setting UDG_OTLP_ENDPOINT in the
    ConfigMap is all it takes: nothing sets it by default, and the NetworkPolicy lets the export out."""
    overlay, docs, _ = rendered
    assert "otel" in installed_extras(dockerfile_stages(), SERVE_TARGET[overlay])
    assert "UDG_OTLP_ENDPOINT" in settings_env_names()
    assert "UDG_OTLP_ENDPOINT" not in environment(docs, container(serve_pod(docs), "serve"))
    egress = one(docs, "NetworkPolicy", "udg-ctr-serve")["spec"]["egress"]
    assert {"port": OTLP_HTTP_PORT, "protocol": "TCP"} in [p for rule in egress for p in rule["ports"]]


def test_api_schema(rendered):
    import kubernetes_validate

    _, docs, _ = rendered
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_checkov_policy_scan(renders, tmp_path):
    checkov = shutil.which("checkov") or str(Path(__import__("sys").executable).parent / "checkov")
    assert Path(checkov).exists(), "checkov not found: it is in the dev extra (pip install -e '.[dev]')"
    files = [arg for _, path in renders.values() for arg in ("-f", str(path))]  # both overlays, one run
    result = subprocess.run([checkov, *files, "--framework", "kubernetes", "--skip-download", "--quiet",
                             "--compact", "-o", "json", "--skip-check", ",".join(ACCEPTED_SKIPS)],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env={**__import__("os").environ, "BC_SKIP_MAPPING": "TRUE", "LOG_LEVEL": "ERROR"})
    assert result.stdout.strip(), result.stderr[-2000:]
    report = json.loads(result.stdout)
    reports = report if isinstance(report, list) else [report]
    failed = [(c["check_id"], c["resource"]) for r in reports for c in r["results"]["failed_checks"]]
    skipped = {c["check_id"] for r in reports for c in r["results"].get("skipped_checks", [])}
    passed = sum(r["summary"]["passed"] for r in reports)
    assert not failed, failed
    assert skipped <= set(ACCEPTED_SKIPS) and passed > 100, (skipped, passed)
