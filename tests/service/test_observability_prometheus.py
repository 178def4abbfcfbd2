"""The committed Prometheus config, rules and Grafana dashboard against a real Prometheus scraping a real
`udg serve` (2 workers, real Redis): every expression of the dashboard and of the rules returns data.

- `promtool check config`, `promtool check rules` and `promtool test rules` (the alerts' unit tests) pass;
- a Prometheus on a free port (temporary storage, 1 s scrape and evaluation) loads the committed rules file
  and the committed scrape job with its target pointed at the test's service; traffic of every kind (known
  and cold users, events with and without a click, bad requests), then a Redis outage (rate-limited log
  lines, 503s) and a restart without data (state lost); then every dashboard expression and every recording
  rule returns at least one finite sample, every alert's signal (its expression without the final
  comparison) returns data, no rule has an evaluation error, and UdgStateLost fires.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from tests.serve_process import FAST_FOLLOW, serve_env, start_listening, start_serve, stop, wait_until

ROOT = Path(__file__).resolve().parents[2]
OPS = ROOT / "ops"
PROMETHEUS_CONFIG = OPS / "prometheus" / "prometheus.yml"
RULES = OPS / "prometheus" / "rules" / "udg.yml"
RULE_TESTS = OPS / "prometheus" / "tests" / "udg.test.yml"
DASHBOARD = OPS / "grafana" / "dashboards" / "udg.json"
RATE_INTERVAL = "1m"  # what $__rate_interval stands for here: the whole test's traffic
_COMPARISON = re.compile(r"^(?P<signal>.+?)\s*(==|!=|>=|<=|>|<)\s*-?[0-9.e+]+\s*$", re.S)


def promtool() -> str:
    binary = shutil.which("promtool")
    assert binary, "promtool missing: apt-get install prometheus (.ci/run installs it)"
    return binary


def run_promtool(*args: str) -> str:
    done = subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_promtool_checks_config_and_rules():
    assert "SUCCESS" in run_promtool("check", "config", str(PROMETHEUS_CONFIG))
    assert "SUCCESS: 15 rules found" in run_promtool("check", "rules", str(RULES))


def test_promtool_rule_unit_tests_fire_every_alert():
    assert "SUCCESS" in run_promtool("test", "rules", str(RULE_TESTS))
    alerts = {rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]
              if "alert" in rule}
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    assert alerts == tested, f"alerts without a unit test: {alerts - tested}"


def dashboard_expressions() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    found = [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel["targets"]]
    assert len(found) >= 14
    return found


def rule_expressions() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """-> [(record name, expr)], [(alert name, signal)]."""
    records, signals = [], []
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            if "record" in rule:
                records.append((rule["record"], rule["expr"]))
            else:
                match = _COMPARISON.match(rule["expr"].strip())
                assert match, f"alert {rule['alert']}: expected `<signal> <comparison> <threshold>`"
                signals.append((rule["alert"], match.group("signal")))
    return records, signals


def test_dashboard_is_provisioned_in_compose():
    binary = shutil.which("docker-compose")
    assert binary, "docker-compose missing: apt-get install docker-compose (.ci/run installs it)"
    done = subprocess.run([binary, "--profile", "monitoring", "config"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    compose = yaml.safe_load(done.stdout)["services"]
    assert compose["prometheus"]["image"].startswith("prom/prometheus:")
    assert compose["grafana"]["image"].startswith("grafana/grafana:")
    mounts = " ".join(str(v) for v in compose["grafana"]["volumes"])  # resolved: absolute host paths
    assert str(OPS / "grafana/dashboards") in mounts and str(OPS / "grafana/provisioning") in mounts
    assert str(OPS / "prometheus") in " ".join(str(v) for v in compose["prometheus"]["volumes"])
    datasource = yaml.safe_load((OPS / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uids = {target["datasource"]["uid"] for _, target in
            ((p, t) for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"])}
    assert uids == {datasource["datasources"][0]["uid"]}


# --- live ------------------------------------------------------------------------------------------------

def prometheus_config(targets: dict[str, str], path: Path) -> Path:
    """The committed config with 1 s intervals, the committed rules file and each job aimed at its target
    (`targets`: job name -> host:port, one for every committed job)."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s", scrape_timeout="1s")
    config["rule_files"] = [str((PROMETHEUS_CONFIG.parent / name).resolve()) for name in config["rule_files"]]
    assert {job["job_name"] for job in config["scrape_configs"]} == set(targets)
    for job in config["scrape_configs"]:
        job.pop("dns_sd_configs")
        job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
    path.write_text(yaml.safe_dump(config))
    return path


def start_warmup_worker(redis_url: str, model_repo: Path, log_path: Path) -> tuple[subprocess.Popen, int]:
    """A real `udg warmup` (all users, so the known users' events are applied too) with its /metrics; -> (process,
    metrics port) once it listens."""
    env = {**os.environ, "REDIS_URL": redis_url, "UDG_MODEL_REPO": str(model_repo)}
    return start_listening(lambda port, log: subprocess.Popen(
        [sys.executable, "-m", "udg_cli", "warmup", "--users", "all", "--block-ms", "100", "--metrics-port",
         str(port)], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), log_path)


class PrometheusApi:
    def __init__(self, base: str):
        self.http = httpx.Client(base_url=base, timeout=5)

    def query(self, expr: str) -> list[dict]:
        reply = self.http.get("/api/v1/query", params={"query": expr})
        body = reply.json()  # not JSON while Prometheus starts: a ValueError, retried by wait_until
        assert reply.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
        return body["data"]["result"]

    def finite(self, expr: str) -> list[float]:
        return [float(s["value"][1]) for s in self.query(expr) if math.isfinite(float(s["value"][1]))]


def send_traffic(http: httpx.Client, users: list[str], items: list[str], rounds: int) -> None:
    for i in range(rounds):
        user = users[i % len(users)]
        assert http.post("/v1/score", json={"user_id": user, "candidates": items, "top_k": 3}).status_code == 200
        cold = http.post("/v1/score", json={"user_id": f"new-user-{i}", "candidates": items})
        assert cold.status_code == 200 and cold.json()["cold_start"]
        events = [{"user_id": user, "item_id": items[i % len(items)], "clicked": i % 3 == 0},
                  {"user_id": f"new-user-{i}", "item_id": items[0], "clicked": False}]
        assert http.post("/v1/events/batch", json={"events": events}).status_code == 200
        assert http.post("/v1/score", json={"user_id": user, "candidates": [items[0], items[0]]}).status_code == 422
        http.get("/healthz")


@pytest.mark.slow
def test_prometheus_scrapes_every_worker_and_every_expression_returns_data(
        published, redis_server, model_repo, artifact, users, tmp_path):
    prometheus = shutil.which("prometheus")
    assert prometheus, "prometheus missing: apt-get install prometheus (.ci/run installs it)"
    cleanup = contextlib.ExitStack()  # what was started, stopped in reverse order
    try:
        server, base, port, serve_log = start_serve(serve_env(redis_server.url, model_repo, tmp_path, workers=2,
                                                              **FAST_FOLLOW), tmp_path / "serve.log")
        cleanup.callback(stop, server)
        warmup, warmup_port = start_warmup_worker(redis_server.url, model_repo, tmp_path / "warmup.log")
        cleanup.callback(stop, warmup)
        config = prometheus_config({"udg": f"127.0.0.1:{port}", "udg-warmup": f"127.0.0.1:{warmup_port}"},
                                   tmp_path / "prometheus.yml")
        prom, prom_port = start_listening(lambda port, log: subprocess.Popen(
            [prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"], stdout=log, stderr=subprocess.STDOUT),
            tmp_path / "prometheus.log")
        cleanup.callback(prom.wait, timeout=15)
        cleanup.callback(prom.terminate)
        api = PrometheusApi(f"http://127.0.0.1:{prom_port}")

        def scraped(expr: str) -> float:
            values = api.finite(expr)
            return values[0] if values else -1.0
        known = [str(u) for u in users["user_ids"][:20]]
        items = list(artifact.schema.items.tokens[2:22])
        with httpx.Client(base_url=base, timeout=5) as http:
            wait_until(lambda: api.finite('up{job="udg"}') == [1.0], 30, "target scraped and up")
            wait_until(lambda: api.finite('up{job="udg-warmup"}') == [1.0], 60, "the warm-up worker scraped and up")
            # Two rounds with a scrape between: a series' first sample already holds its first round, so a
            # rate needs the second to see an increase.
            for rounds, total in ((5, 25), (25, 150)):
                send_traffic(http, known, items, rounds)
                wait_until(lambda t=total: scraped("sum(udg_http_responses_total)") >= t, 20, "the traffic scraped")
                wait_until(lambda t=total: scraped("sum(udg_warmup_staleness_seconds_count)") >= t // 5 * 2, 30,
                           "the events warmed and scraped")  # two events per round, each applied once
            # both workers answered and both are in the scrape: per-worker gauges carry a pid each
            pids = wait_until(lambda: {s["metric"]["pid"] for s in api.query("udg_ready")} if len(
                api.query("udg_ready")) == 2 else None, 20, "udg_ready of both workers")
            assert len(pids) == 2
            # a worker killed: uvicorn starts another; the dead one's gauges leave /metrics (its counters stay)
            os.kill(int(min(pids)), signal.SIGKILL)

            def replaced():
                live = {s["metric"]["pid"] for s in api.query("udg_ready")}
                return live if len(live) == 2 and min(pids) not in live else None

            wait_until(replaced, 40, "the killed worker replaced in the scrape")
            assert scraped("sum(udg_http_responses_total)") >= 150

            # a Redis outage (503s, rate-limited lines), then Redis back without its data: state lost
            redis_server.process.kill()
            redis_server.process.wait()
            seen = collections.Counter()  # error kind -> answers: the counters must reach these
            for count in (10, 30):
                answers = [http.post("/v1/score", json={"user_id": known[0], "candidates": items})
                           for _ in range(count)]
                assert {answer.status_code for answer in answers} == {503}
                seen.update(answer.json()["error"] for answer in answers)
                assert "redis_unavailable" in seen, seen

                def outage_scraped():
                    return all(scraped(f'sum(udg_errors_total{{kind="{kind}"}})') >= n for kind, n in seen.items())
                try:
                    wait_until(outage_scraped, 60, "the outage scraped")
                except AssertionError as error:
                    counted = {kind: scraped(f'sum(udg_errors_total{{kind="{kind}"}})') for kind in seen}
                    raise AssertionError(f"{error}: answered {dict(seen)}, scraped {counted}, up "
                                         f"{api.query('up')}\n{serve_log.read_text()[-3000:]}") from None
            redis_server.start()
            wait_until(lambda: api.finite("max(udg_state_lost)") == [1.0], 30, "state loss scraped")
            wait_until(lambda: api.query("udg_log_lines_suppressed_total"), 10, "suppressed lines scraped")
            wait_until(lambda: api.query("udg:http_errors:ratio_rate5m"), 10, "recording rules evaluated")

        def returns_data(expr: str) -> bool:
            return bool(api.finite(expr.replace("$__rate_interval", RATE_INTERVAL)))

        records, signals = rule_expressions()
        missing = [f"dashboard {title!r}: {expr}" for title, expr in dashboard_expressions() if not returns_data(expr)]
        missing += [f"rule {name}: {expr}" for name, expr in records if not returns_data(expr) or
                    not returns_data(name)]
        missing += [f"alert {name}: {signal}" for name, signal in signals if not returns_data(signal)]
        assert not missing, "expressions without data:\n" + "\n".join(missing)

        groups = api.http.get("/api/v1/rules").json()["data"]["groups"]
        unhealthy = [(r["name"], r.get("lastError")) for g in groups for r in g["rules"] if r["health"] != "ok"]
        assert not unhealthy and sum(len(g["rules"]) for g in groups) == 15, unhealthy
        firing = wait_until(lambda: {a["labels"]["alertname"] for a in api.http.get("/api/v1/alerts").json()[
            "data"]["alerts"] if a["state"] == "firing"} or None, 10, "an alert firing")
        assert "UdgStateLost" in firing
        assert api.finite("sum(udg_arm_events_total)")[0] == 60  # every event under the arm serving its user
        assert warmup.poll() is None, (tmp_path / "warmup.log").read_text()[-2000:]  # it outlived the outage
    finally:
        cleanup.close()
