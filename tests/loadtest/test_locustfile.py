"""loadtest/locustfile.py: population from a published artifact, task selection by tag and weight, request bodies.

Importing locust monkey-patches the standard library with gevent, which must not leak into the rest of the
test session: the locustfile is exercised in a child interpreter (one per scenario) against a fake client
(no network), and the child reports what it would have sent as JSON. The bodies are then validated here with
the service's own request schemas.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

# find_spec, not importorskip: importing locust here would monkey-patch this process with gevent.
if importlib.util.find_spec("locust") is None:
    pytest.skip("locust is not installed (the loadtest extra)", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]
LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"
FIELDS = ("age", "gender", "occupation")
USERS = [f"u{i}" for i in range(200)]
ITEMS = [f"i{i}" for i in range(1500)]

# The child: import the locustfile, build an Environment with the requested tags (locust filters the user
# class's tasks in place), and let one or more users pick and run tasks through DefaultTaskSet, as a runner does.
DRIVER = r"""
import importlib.util, json, random, sys
import msgpack

plan = json.loads(sys.argv[2])
random.seed(1234)  # locust picks tasks with the global random: make the draw order reproducible
sent, failures = [], []


class FakeResponse:
    def __init__(self, body, status, packed=False):
        n = len(body.get("candidates", []))
        self.status_code = status
        self.text = "unavailable" if status != 200 else ""
        self._payload = {"scores": [0.5] * n, "model_version": "vtest", "cold_start": False}
        self.content = msgpack.packb(self._payload) if packed else b""

    def json(self):
        return self._payload

    def failure(self, message):
        failures.append(str(message))

    def success(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class FakeClient:
    def __init__(self, status):
        self.status = status

    def post(self, path, json=None, name=None, catch_response=False, data=None, headers=None, **kwargs):
        packed = (headers or {}).get("Content-Type") == "application/msgpack"
        body = msgpack.unpackb(data) if packed else json
        sent.append({"path": path, "name": name, "body": body, "headers": headers or {}})
        return FakeResponse(body, self.status, packed=(headers or {}).get("Accept") == "application/msgpack")


def check_config(module, env):
    # What a run does before and at its first task, with `env` as the environment.
    module.parse_weights(env.get("UDG_LOADTEST_WEIGHTS"))
    population = module.load_population(env)
    workload = module.Workload(population, module.Config.from_env(env), random.Random(0))
    workload.score_request()


result = {"sent": sent, "failures": failures, "error": None, "tasks": [], "errors": []}
try:
    spec = importlib.util.spec_from_file_location("udg_locustfile", sys.argv[1])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    from locust.env import Environment
    from locust.user.task import DefaultTaskSet

    for env in plan.get("configs", []):
        try:
            check_config(module, env)
            result["errors"].append(None)
        except Exception as error:
            result["errors"].append(f"{type(error).__name__}: {error}")
    if plan.get("draws"):
        env = Environment(user_classes=[module.ScoringUser], tags=plan.get("tags"))
        module.ScoringUser.host = "http://127.0.0.1:9"  # never contacted: the client is replaced
        env._filter_tasks_by_tags()
        result["tasks"] = sorted({t.__name__ for t in module.ScoringUser.tasks})
        for _ in range(plan.get("users", 1)):
            user = module.ScoringUser(env)
            user.client = FakeClient(plan.get("status", 200))
            user.on_start()
            taskset = DefaultTaskSet(user)
            for _ in range(plan["draws"]):
                taskset.execute_task(taskset.get_next_task())
        result["population"] = module.shared_population().describe()
except Exception as error:  # reported to the test, which decides
    result["error"] = f"{type(error).__name__}: {error}"
print("RESULT " + json.dumps(result))
"""


def write_artifact(root: Path, version: str = "vtest") -> Path:
    """A version directory in the artifact layout (manifest feature schema + users.npz), without any graph."""
    path = root / version
    path.mkdir(parents=True)

    def field(name: str, tokens: list[str]) -> dict:
        return {"name": name, "kind": "categorical", "width": 1, "vocab": {"tokens": tokens, "hash_buckets": 0}}

    manifest = {
        "format": "udg-artifact/2", "version": version,
        "features": {
            "users": {"tokens": USERS, "hash_buckets": 0}, "items": {"tokens": ITEMS, "hash_buckets": 0},
            "user_fields": [field("age", ["18", "25", "35"]), field("gender", ["F", "M"]),
                            field("occupation", ["artist", "student"])],
            "item_fields": [], "max_history": 8,
        },
        "vocab": {
            "pad_index": 0, "oov_index": 1,
            "items": {"size": len(ITEMS) + 2, "known": len(ITEMS), "file": "items.npz"},
            "users": {"size": len(USERS) + 2, "known": len(USERS), "file": "users.npz"},
        },
    }
    (path / "manifest.json").write_text(json.dumps(manifest))
    profiles = [[("18", "25", "35")[i % 3], "FM"[i % 2], ("artist", "student")[i % 2] if i % 7 else ""]
                for i in range(len(USERS))]
    np.savez(path / "users.npz", user_ids=np.array(USERS), profile=np.array(profiles),
             profile_fields=np.array(FIELDS), history_len=np.zeros(len(USERS), np.int64))
    return path


def run_locustfile(env: dict[str, str], draws: int, tags: list[str] | None = None, users: int = 1,
                   status: int = 200, configs: list[dict[str, str]] | None = None) -> dict:
    plan = {"tags": tags, "draws": draws, "users": users, "status": status, "configs": configs or []}
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(("UDG_", "LOCUST_"))}
    child_env.update(env)
    done = subprocess.run([sys.executable, "-c", DRIVER, str(LOCUSTFILE), json.dumps(plan)], env=child_env,
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"driver failed (rc {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_artifact(tmp_path_factory.mktemp("model_repo"))


@pytest.fixture(scope="module")
def mixed(model_dir) -> dict:
    """All tasks, default weights, four locust users drawing 150 tasks each."""
    result = run_locustfile({"UDG_MODEL_REPO": str(model_dir.parent), "UDG_LOADTEST_SEED": "7"}, draws=150, users=4)
    assert result["error"] is None, result["error"]
    return result


def by_name(result: dict) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for request in result["sent"]:
        groups.setdefault(request["name"], []).append(request)
    return groups


def test_mix_follows_default_weights(mixed):
    assert mixed["tasks"] == ["cold", "score", "send_event"]
    assert "200 known users, 1,500 items" in mixed["population"] and "vtest" in mixed["population"]
    counts = Counter(r["name"] for r in mixed["sent"])
    assert set(counts) == {"/v1/score known", "/v1/score cold", "/v1/events"}
    total = sum(counts.values())
    assert total == 600 and not mixed["failures"]
    # weights 8 : 1 : 3 -> 0.667, 0.083, 0.25 of the draws (loose bounds: 600 draws)
    assert 0.58 < counts["/v1/score known"] / total < 0.75
    assert 0.04 < counts["/v1/score cold"] / total < 0.14
    assert 0.18 < counts["/v1/events"] / total < 0.33


def test_known_users_are_the_published_population(mixed):
    known = by_name(mixed)["/v1/score known"]
    assert all(r["path"] == "/v1/score" and "profile" not in r["body"] for r in known)
    user_ids = Counter(r["body"]["user_id"] for r in known)
    assert set(user_ids) <= set(USERS)
    assert len(user_ids) > 100  # uniform over 200 users by default: no single hot user
    assert user_ids.most_common(1)[0][1] < 15  # ~2 requests per user on average


def test_candidate_lists_follow_the_size_distribution(mixed):
    bodies = [r["body"] for r in mixed["sent"] if r["path"] == "/v1/score"]
    sizes = sorted(len(b["candidates"]) for b in bodies)
    assert sizes[0] >= 50 and sizes[-1] <= 1000
    assert 120 < sizes[len(sizes) // 2] < 400  # log-uniform on 50..1000: median ~ 224
    candidates = [c for b in bodies for c in b["candidates"]]
    unknown = [c for c in candidates if c not in set(ITEMS)]
    assert all(c.startswith("unknown-item-") for c in unknown)
    assert 0.003 < len(unknown) / len(candidates) < 0.03  # UDG_LOADTEST_UNKNOWN_ITEMS default 0.01
    # the service answers 422 to a repeated candidate: not one list may hold one
    assert all(len(set(b["candidates"])) == len(b["candidates"]) for b in bodies)


def test_cold_users_are_new_and_send_published_profiles(mixed):
    cold = by_name(mixed)["/v1/score cold"]
    user_ids = [r["body"]["user_id"] for r in cold]
    assert len(set(user_ids)) == len(user_ids) and not set(user_ids) & set(USERS)
    for r in cold:
        profile = r["body"]["profile"]
        assert set(profile) <= set(FIELDS) and {"age", "gender"} <= set(profile)
        assert profile["age"] in {"18", "25", "35"} and profile["gender"] in {"F", "M"}
        assert profile.get("occupation", "artist") in {"artist", "student"}  # "" (missing) is left out


def test_events_are_known_users_on_catalogue_items(mixed):
    sent = by_name(mixed)["/v1/events"]
    assert all(set(r["body"]) == {"user_id", "item_id", "clicked", "ts"} for r in sent)
    assert {r["body"]["user_id"] for r in sent} <= set(USERS)
    assert {r["body"]["item_id"] for r in sent} <= set(ITEMS)
    clicks = sum(r["body"]["clicked"] for r in sent) / len(sent)
    assert 0.15 < clicks < 0.45  # UDG_LOADTEST_CLICK_RATE default 0.3


def test_bodies_match_the_service_request_schemas(mixed):
    schemas = pytest.importorskip("service.api.schemas")
    for request in mixed["sent"]:
        model = schemas.ScoreRequest if request["path"] == "/v1/score" else schemas.Event
        model.model_validate(request["body"])


@pytest.mark.parametrize("tag,name", [("score", "/v1/score known"), ("cold", "/v1/score cold"),
                                      ("events", "/v1/events")])
def test_each_tag_runs_alone(model_dir, tag, name):
    result = run_locustfile({"UDG_LOADTEST_MODEL_DIR": str(model_dir)}, draws=40, tags=[tag])
    assert result["error"] is None, result["error"]
    assert len(result["tasks"]) == 1
    assert {r["name"] for r in result["sent"]} == {name} and len(result["sent"]) == 40


def test_env_configuration_and_fallback_ids():
    """No artifact: ids from env; weights, fixed sizes, top_k and skew from env."""
    env = {"UDG_LOADTEST_USERS": "alice,bob,carol", "UDG_LOADTEST_ITEMS": ",".join(ITEMS[:300]),
           "UDG_LOADTEST_WEIGHTS": "score=1,cold=0,events=0", "UDG_LOADTEST_CANDIDATES": "fixed:120",
           "UDG_LOADTEST_TOP_K": "10", "UDG_LOADTEST_USER_SKEW": "2", "UDG_LOADTEST_UNKNOWN_ITEMS": "0"}
    result = run_locustfile(env, draws=60)
    assert result["error"] is None, result["error"]
    assert result["tasks"] == ["score"] and "UDG_LOADTEST_USERS" in result["population"]
    bodies = [r["body"] for r in result["sent"]]
    assert all(len(b["candidates"]) == 120 and b["top_k"] == 10 for b in bodies)
    assert all(set(b["candidates"]) <= set(ITEMS[:300]) for b in bodies)
    users = Counter(b["user_id"] for b in bodies)
    assert set(users) <= {"alice", "bob", "carol"} and users.most_common(1)[0][1] > 30  # Zipf s=2: one dominates


def test_cold_only_needs_no_known_users_and_uses_fallback_profiles():
    result = run_locustfile({"UDG_LOADTEST_ITEMS": "a,b,c", "UDG_LOADTEST_CANDIDATES": "2-3"}, draws=10,
                            tags=["cold"])
    assert result["error"] is None, result["error"]
    # Without an artifact nothing says which profile fields the model has (they are the data set's): cold users
    # send the empty profile (all fields OOV), which any version accepts. (MovieLens-shaped fallback profiles
    # were sent before the feature schema; a model of another data set would refuse their fields.)
    assert len(result["sent"]) == 10
    assert all(2 <= len(r["body"]["candidates"]) <= 3 and r["body"]["profile"] == {} for r in result["sent"])


def test_without_published_profiles_cold_users_combine_the_profile_vocabularies(tmp_path):
    path = write_artifact(tmp_path)
    with np.load(path / "users.npz") as data:
        arrays = {k: data[k] for k in data.files if k not in ("profile", "profile_fields")}
    np.savez(path / "users.npz", **arrays)
    result = run_locustfile({"UDG_LOADTEST_MODEL_DIR": str(path)}, draws=20, tags=["cold"])
    assert result["error"] is None, result["error"]
    for request in result["sent"]:
        profile = request["body"]["profile"]
        assert set(profile) == set(FIELDS)
        assert profile["age"] in {"18", "25", "35"} and profile["gender"] in {"F", "M"}
        assert profile["occupation"] in {"artist", "student"}


MISCONFIGURATIONS = [
    ({}, "no items to score"),
    ({"UDG_LOADTEST_ITEMS": "a", "UDG_LOADTEST_CANDIDATES": "gaussian:1:2"}, "unknown distribution"),
    ({"UDG_LOADTEST_ITEMS": "a", "UDG_LOADTEST_CANDIDATES": "0-10"}, "1 <= low <= high"),
    ({"UDG_LOADTEST_ITEMS": "a", "UDG_LOADTEST_CANDIDATES": "many"}, "UDG_LOADTEST_CANDIDATES"),
    ({"UDG_LOADTEST_ITEMS": "a", "UDG_LOADTEST_CLICK_RATE": "2"}, "UDG_LOADTEST_CLICK_RATE"),
    ({"UDG_LOADTEST_ITEMS": "a", "UDG_LOADTEST_WEIGHTS": "score=x"}, "UDG_LOADTEST_WEIGHTS"),
    ({"UDG_LOADTEST_ITEMS": "a", "UDG_LOADTEST_WEIGHTS": "clicks=1"}, "UDG_LOADTEST_WEIGHTS"),
    ({"UDG_LOADTEST_MODEL_DIR": "/nonexistent/v1"}, "holds no manifest.json"),
    ({"UDG_LOADTEST_ITEMS": "a"}, "need known users"),  # the score task without any known user
    ({"UDG_LOADTEST_ITEMS": "a", "UDG_LOADTEST_USERS": "u", "UDG_LOADTEST_CANDIDATES": "choice:1,5"}, None),
]


def test_misconfiguration_is_reported():
    """Each bad setting stops the run with a message naming it (checked in one child interpreter)."""
    result = run_locustfile({}, draws=0, configs=[env for env, _ in MISCONFIGURATIONS])
    assert result["error"] is None, result["error"]
    for (env, message), error in zip(MISCONFIGURATIONS, result["errors"], strict=True):
        if message is None:
            assert error is None, (env, error)
        else:
            assert error is not None and message in error, (env, error)


def test_bad_weights_fail_at_import():
    result = run_locustfile({"UDG_LOADTEST_ITEMS": "a", "UDG_LOADTEST_WEIGHTS": "score=-1"}, draws=1)
    assert result["error"] is not None and "UDG_LOADTEST_WEIGHTS" in result["error"]


def test_server_errors_are_counted_as_failures(model_dir):
    result = run_locustfile({"UDG_LOADTEST_MODEL_DIR": str(model_dir)}, draws=20, status=503)
    assert result["error"] is None, result["error"]
    assert len(result["failures"]) == 20 and all("HTTP 503" in f for f in result["failures"])


def test_msgpack_bodies_carry_the_same_requests_and_read_the_answers(model_dir):
    """UDG_LOADTEST_BODY=msgpack: the score tasks send msgpack both ways, the events stay JSON; a bad value stops."""
    env = {"UDG_LOADTEST_MODEL_DIR": str(model_dir), "UDG_LOADTEST_BODY": "msgpack", "UDG_LOADTEST_SEED": "3"}
    bad = {"UDG_LOADTEST_MODEL_DIR": str(model_dir), "UDG_LOADTEST_BODY": "protobuf"}
    result = run_locustfile(env, draws=60, configs=[bad])
    assert result["error"] is None and not result["failures"], result
    scores = [r for r in result["sent"] if r["path"] == "/v1/score"]
    assert scores and all(r["headers"] == {"Content-Type": "application/msgpack", "Accept": "application/msgpack"}
                          and r["body"]["candidates"] for r in scores)
    assert all(r["headers"] == {} for r in result["sent"] if r["path"] == "/v1/events")
    assert "UDG_LOADTEST_BODY" in result["errors"][0] and "protobuf" in result["errors"][0]
