"""The Grafana dashboard (ops/grafana) checked offline, as far as that goes without a Grafana server.

No Grafana can be installed on the project's machines (no Debian package, nothing on PyPI or npm that runs a
server, and no image registry), so the dashboard is never loaded into a real one here. What a load would
reject or show empty is checked instead:

- the JSON is a dashboard Grafana provisions: a uid and title, an integer schemaVersion, unique integer panel
  ids, known panel types, grid positions inside the 24 columns that do not overlap;
- every panel has the provisioned Prometheus datasource (ops/grafana/provisioning/datasources) and at least
  one target; each target has a refId unique in its panel, the same datasource and an expression;
- every variable an expression uses is a Grafana built-in or defined in the dashboard's templating;
- every expression parses, by Prometheus's own parser (`promtool check rules` on the expressions written as
  recording rules, Grafana's variables replaced as Grafana would);
- every metric an expression reads is one the service exports (service/metrics.py) or a committed recording
  rule, and every label it groups by is a label of one of those metrics (or a label Prometheus adds);
- the provisioning files point where compose mounts the dashboards and at compose's Prometheus.

tests/service/test_observability_prometheus.py runs every expression against a real Prometheus scraping a real
`udg serve` and requires data from each.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "ops" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "udg.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "udg.yml"
RULES = ROOT / "ops" / "prometheus" / "rules" / "udg.yml"
PANEL_TYPES = {"timeseries", "stat", "gauge", "bargauge", "table", "text", "row", "heatmap", "piechart"}
# Grafana's global variables (what each stands for when the expression is parsed here)
BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h", "__range_s": "3600",
            "__range_ms": "3600000", "__interval_ms": "15000"}
TARGET_LABELS = {"instance", "job", "le", "quantile"}  # added by Prometheus's scrape, or a histogram's buckets
_VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")
_IDENTIFIER = re.compile(r"(?<![\w:\"'])([a-zA-Z_:][\w:]*)\s*(?=[{\[)\s]|$)")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
PROMQL_WORDS = {"sum", "avg", "min", "max", "count", "rate", "irate", "increase", "histogram_quantile", "by",
                "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset",
                "clamp_min", "clamp_max", "abs", "delta", "deriv", "topk", "bottomk", "time", "vector", "scalar",
                "absent", "changes", "resets", "max_over_time", "min_over_time", "avg_over_time", "label_replace"}


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(dashboard: dict) -> list[dict]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # a collapsed row holds its panels
    return out


def targets(dashboard: dict) -> list[tuple[dict, dict]]:
    return [(panel, target) for panel in panels(dashboard) for target in panel.get("targets", [])]


def provisioned_uid() -> str:
    (datasource,) = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert datasource["type"] == "prometheus"
    return datasource["uid"]


def test_dashboard_structure_is_what_grafana_provisions(dashboard):
    assert dashboard["uid"] and dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    assert "id" not in dashboard or dashboard["id"] is None  # a provisioned dashboard gets its id from Grafana
    ids = [p["id"] for p in panels(dashboard)]
    assert all(isinstance(i, int) for i in ids) and len(ids) == len(set(ids)), ids
    cells: dict[tuple[int, int], str] = {}
    for panel in panels(dashboard):
        assert panel["type"] in PANEL_TYPES, (panel["title"], panel["type"])
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] >= 1 and grid["x"] + grid["w"] <= 24, (panel["title"], grid)
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]


def test_every_panel_queries_the_provisioned_prometheus(dashboard):
    uid = provisioned_uid()
    for panel in panels(dashboard):
        if panel["type"] in ("row", "text"):
            continue
        assert panel.get("datasource") == {"type": "prometheus", "uid": uid}, panel["title"]
        assert panel.get("targets"), f"{panel['title']!r} has no query"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), (panel["title"], refs)
        for target in panel["targets"]:
            assert target.get("datasource", panel["datasource"]) == panel["datasource"], panel["title"]
            assert target.get("expr", "").strip(), (panel["title"], target["refId"])
    assert len(targets(dashboard)) >= 14


def grafana_variables(dashboard: dict) -> dict[str, str]:
    """Every variable an expression may use -> a value to parse it with."""
    defined = {v["name"]: ".*" for v in dashboard.get("templating", {}).get("list", [])}
    return {**BUILTINS, **defined}


def test_expressions_use_only_known_variables(dashboard):
    known = grafana_variables(dashboard)
    for panel, target in targets(dashboard):
        used = {a or b for a, b in _VARIABLE.findall(target["expr"])}
        assert used <= set(known), (panel["title"], sorted(used - set(known)))


def test_expressions_parse_with_prometheus_parser(dashboard, tmp_path):
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: apt-get install prometheus (.ci/run installs it)"
    known = grafana_variables(dashboard)
    rules = [{"record": f"udg_dashboard:panel{panel['id']}_{target['refId']}",
              "expr": _VARIABLE.sub(lambda m: known[m.group(1) or m.group(2)], target["expr"])}
             for panel, target in targets(dashboard)]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules)} rules found" in done.stdout

    broken = tmp_path / "broken.yml"  # the check is a parser: a broken expression fails it
    broken.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [
        {"record": "x:y", "expr": "sum by (route (rate(udg_http_responses_total[1m]))"}]}]}))
    assert subprocess.run([promtool, "check", "rules", str(broken)], capture_output=True, timeout=60).returncode


def exported_series() -> dict[str, set[str]]:
    """Series name -> its label names: every metric the service exports, and every recording rule (whose labels
    are those its expression keeps: taken as any label of the service's metrics)."""
    from prometheus_client import REGISTRY

    from service import metrics

    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count"),
                "summary": ("_sum", "_count")}
    series: dict[str, set[str]] = {}
    for value in vars(metrics).values():
        labels = getattr(value, "_labelnames", None)  # a prometheus_client metric object
        name = getattr(value, "_name", None)
        kind = getattr(value, "_type", None)
        if labels is None or name is None or kind not in suffixes:
            continue
        for suffix in suffixes[kind]:
            series[name + suffix] = set(labels)
    families = {m.name for m in REGISTRY.collect() if m.name.startswith("udg_")}
    assert families <= {name.rsplit("_", 1)[0] if name.endswith(("_total", "_bucket", "_sum", "_count")) else name
                        for name in series}, "a metric of the service's registry was not found in service.metrics"
    every_label = set().union(*series.values())
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            if "record" in rule:
                series[rule["record"]] = every_label
    return series


def test_expressions_read_exported_metrics_and_labels(dashboard):
    series = exported_series()
    assert "udg_request_seconds_bucket" in series and "udg:http_errors:ratio_rate5m" in series
    for panel, target in targets(dashboard):
        expr = re.sub(r"\[[^\]]*\]", "", target["expr"])  # range selectors
        expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
        grouping = {label.strip() for found in _GROUPING.findall(expr) for label in found.split(",") if label.strip()}
        expr = _GROUPING.sub(" ", expr)
        names = {n for n in _IDENTIFIER.findall(expr) if n not in PROMQL_WORDS and not n.startswith("__")}
        unknown = names - set(series)
        assert not unknown, f"{panel['title']!r}: no such series {sorted(unknown)}"
        labels = set().union(*(series[n] for n in names)) | TARGET_LABELS
        assert grouping <= labels, f"{panel['title']!r}: grouped by {sorted(grouping - labels)}, not a label of {names}"


def test_provisioning_points_where_compose_mounts_and_at_its_prometheus():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    mounts = dict(volume.rsplit(":", 2)[:2] for volume in compose["grafana"]["volumes"] if volume.startswith("./"))
    (provider,) = yaml.safe_load(PROVIDERS.read_text())["providers"]
    assert mounts["./ops/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./ops/grafana/provisioning"] == "/etc/grafana/provisioning"
    (datasource,) = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    prometheus_port = compose["prometheus"]["command"][-1].rsplit(":", 1)[1]
    assert datasource["url"] == f"http://prometheus:{prometheus_port}"
    home = compose["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"
