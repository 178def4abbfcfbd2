"""`udg loadtest` end to end (private redis-server, `udg serve`, locust headless, report) against the tiny
session model, plus the report builder on hand-written locust CSVs and the command's guards.

The end-to-end runs take ~7-10 s each on the 2-core project machine (plus ~30 s for the shared tiny-model fixture);
it is marked `slow` but runs in `make test`."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OUTPUTS = ("locust_stats.csv", "locust_stats_history.csv", "report.html", "latency_throughput.png", "summary.md")


def udg(*argv: str, timeout: float = 150) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "udg_cli", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**_env_without_redis()})


def _env_without_redis() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "UDG_REDIS_URL")}


@pytest.mark.slow
def test_headless_run_writes_the_report(model_repo, tmp_path):
    # Not importorskip("locust"): importing locust monkey-patches the standard library with gevent (and hangs
    # here); it only ever runs in the child.
    for package in ("locust", "matplotlib"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed (the loadtest extra)")
    out = tmp_path / "loadtest"
    started = time.monotonic()
    result = udg("loadtest", "--model-repo", str(model_repo), "--version", "v1", "--run-time", "4", "--users", "2",
                 "--workers", "1", "--out", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in OUTPUTS:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "latency_throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (out / "summary.md").read_text()
    assert "**0 failures**" in summary
    assert "/v1/score known" in summary and "| **all** |" in summary
    total = [line for line in summary.splitlines() if line.startswith("| **all** |")][0]
    assert int(total.split("|")[2].replace(",", "")) > 0  # requests were made
    assert time.monotonic() - started < 90


@pytest.mark.slow
def test_swap_through_the_admin_api(model_repo, tmp_path):
    """--swap calls POST /v1/admin/versions/V/activate (token made up for the service started here), records the
    swap and marks it; with one version in the repository it re-activates the serving one."""
    out = tmp_path / "swap"
    result = udg("loadtest", "--model-repo", str(model_repo), "--version", "v1", "--run-time", "3", "--users", "1",
                 "--workers", "1", "--out", str(out), "--swap", "v1@1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    swaps = json.loads((out / "swaps.json").read_text())
    assert [(s["version"], s["ok"]) for s in swaps] == [("v1", True)], swaps
    assert "## Model-version swaps" in (out / "summary.md").read_text()


def test_swap_route_discovery():
    """The admin route is found in the service's OpenAPI schema; a service without one gets None ("not available")."""
    import http.server
    import threading

    from loadtest.commands import admin_swap_route

    schemas = {"with": {"paths": {"/v1/score": {"post": {}}, "/v1/admin/versions": {"get": {}},
                                  "/v1/admin/versions/{version}/load": {"post": {}},
                                  "/v1/admin/versions/{version}/activate": {"post": {}}}},
               "without": {"paths": {"/v1/score": {"post": {}}}}}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server API
            body = json.dumps(schemas[self.path.split("/")[1]]).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        assert admin_swap_route(base + "/with") == "/v1/admin/versions/{version}/activate"
        assert admin_swap_route(base + "/without") is None
    finally:
        server.shutdown()


def test_only_loopback_targets(capsys):
    from udg_cli import main

    assert main(["loadtest", "--host", "http://192.0.2.10:8000", "--run-time", "1"]) == 2
    assert "127.0.0.1" in capsys.readouterr().err
    assert main(["loadtest", "--users", "100000"]) == 2
    assert main(["loadtest", "--run-time", "0"]) == 2


HEADER = ("Type,Name,Request Count,Failure Count,Median Response Time,Average Response Time,Min Response Time,"
          "Max Response Time,Average Content Size,Requests/s,Failures/s,50%,66%,75%,80%,90%,95%,98%,99%,99.9%,"
          "99.99%,100%")
HISTORY = ("Timestamp,User Count,Type,Name,Requests/s,Failures/s,50%,66%,75%,80%,90%,95%,98%,99%,99.9%,99.99%,"
           "100%,Total Request Count,Total Failure Count,Total Median Response Time,Total Average Response Time,"
           "Total Min Response Time,Total Max Response Time,Total Average Content Size")


def test_report_from_locust_csvs(tmp_path):
    pytest.importorskip("matplotlib")
    from loadtest import report

    (tmp_path / report.STATS_FILE).write_text("\n".join([
        HEADER,
        "POST,/v1/score known,900,3,12,14,2,80,5000,90.0,0.3,12,13,14,15,20,30,40,50,70,80,80",
        "POST,/v1/events,300,0,2,2,1,9,80,30.0,0,2,2,2,2,3,4,5,6,9,9,9",
        ",Aggregated,1200,3,10,11,1,80,3800,120.0,0.3,10,12,13,14,18,28,38,48,70,80,80"]) + "\n")
    rows = [HISTORY]
    for second in range(5):
        stamp = 1_700_000_000 + second
        rows.append(f"{stamp},4,POST,/v1/score known,{80 + second},0,12,13,14,15,20,30,40,50,70,80,80,"
                    f"{100 * second},0,12,14,2,80,5000")
        rows.append(f"{stamp},4,,Aggregated,{110 + second},0.0,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,"
                    f"{130 * second},0,10,11,1,80,3800" if second == 0 else
                    f"{stamp},4,,Aggregated,{110 + second},0.0,10,12,13,14,18,28,38,48,70,80,80,"
                    f"{130 * second},0,10,11,1,80,3800")
    (tmp_path / report.HISTORY_FILE).write_text("\n".join(rows) + "\n")
    (tmp_path / report.SWAPS_FILE).write_text(json.dumps([{"at": 1_700_000_002.5, "version": "v2", "ok": True,
                                                           "result": "HTTP 200"}]))
    parsed, plot_file, summary_file = report.build(tmp_path, {"target": "http://127.0.0.1:1"})
    assert [r.name for r in parsed][-1] == "Aggregated"
    assert plot_file.read_bytes()[:4] == b"\x89PNG"
    summary = summary_file.read_text()
    assert "**120.0 requests/s** over 1,200 requests; **3 failures** (0.25%)" in summary
    assert "| `POST /v1/score known` | 900 | 3 | 90.0 | 12.0 | 30.0 | 50.0 | 80.0 |" in summary
    assert "| 2.5 | v2 | HTTP 200 |" in summary


FAKE_SERVER = """
import http.server


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        body = b'{"scores": [0.5]}'
        self.send_response(200 if "fail" not in self.path else 503)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_port, flush=True)
server.serve_forever()
"""


def test_bench_compare_load_generator_and_table():
    """The benchmark's HTTP client against a keep-alive HTTP/1.1 server, and the table with its target lines."""
    import subprocess
    import sys

    from loadtest.bench_compare import format_table, raw_post, run_load, summarise

    # The fake server runs in its own process: late in a long pytest session a server thread in this process
    # was seen starved while the load generator's event loop held the main thread.
    server = subprocess.Popen([sys.executable, "-c", FAKE_SERVER], stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        ok = run_load(port, [raw_post("/v1/score", b'{"user_id": "u"}')], 2, 0.5, 0.1, 50)
        bad = run_load(port, [raw_post("/fail", b"{}")], 1, 0.3, 0.0, 5)
    finally:
        server.kill()
        server.wait()
    assert 0 < len(ok["latencies"]) <= 52 and not ok["errors"] and ok["completed"] >= len(ok["latencies"])
    assert bad["errors"] and bad["errors"][0].startswith("HTTP 503")

    def cell(p50, p99, rps, cpu):
        return {**summarise([p50 / 1e3] * 98 + [p99 / 1e3] * 2, 100 / rps), "cpu_ms_per_request": cpu,
                "client_cpu_ms_per_request": 0.1}

    results = {"candidates": 500, "cpus": 2, "ort_threads": 1, "duration_s": 8, "load": {"before": [1.0],
               "after": [1.5]}, "floor": summarise([0.0013] * 98 + [0.002] * 2, 0.13),
               "ceiling": {2: {"rps": 1000.0, "cpu_ms_per_call": 1.3}},
               "cells": {"2/1": {"service": cell(2.0, 3.0, 400, 2.0), "naive": cell(6.0, 20.0, 100, 7.0)},
                         "2/16": {"service": cell(20.0, 40.0, 800, 1.6), "naive": cell(90.0, 200.0, 300, 6.5)}}}
    table = format_table(results)
    assert "| 2 | 16 | 1,000 | 20.00 / 40.00 | 800 | 90.00 / 200.00 | 300 |" in table
    assert "- service req/s >= 2x naive (conc 16): 2.67 — met" in table
    assert "- service req/s >= 75% of the model-only ceiling (conc 16): 0.80 — met" in table
    assert "- service p99 <= 3x the floor's p99 (conc 1): 1.50 — met" in table
    assert "CPU-based: service >= 75% of the ceiling on idle CPUs (conc 16): 0.76 — met" in table


def test_bench_compare_reprints_a_journal(tmp_path, capsys):
    """`udg bench compare --report JOURNAL`: the journal --json wrote (integer keys now strings) -> the same table."""
    from loadtest.bench_compare import add_arguments, format_table, run, summarise

    cell = {**summarise([0.002] * 100, 0.25), "cpu_ms_per_request": 2.0, "client_cpu_ms_per_request": 0.1}
    results = {"candidates": 500, "cpus": 2, "ort_threads": 1, "duration_s": 8, "load": {"before": [1.0],
               "after": [1.5]}, "floor": summarise([0.0013] * 100, 0.13),
               "ceiling": {2: {"rps": 1000.0, "cpu_ms_per_call": 1.3}}, "cells": {"2/1": {"service": cell}}}
    journal = tmp_path / "compare.json"
    journal.write_text(json.dumps(results, default=str))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert run(parser.parse_args(["--report", str(journal)])) == 0
    assert capsys.readouterr().out.strip() == format_table(results).strip()
