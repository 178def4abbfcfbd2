"""What the request-id layer, the access log and tracing cost per request, measured in process.

    python -m loadtest.bench_observability [--requests 20000] [--rounds 5] [--out FILE.md]

Each configuration is the service's real FastAPI app (service.main.create_app) called directly through ASGI
for GET /healthz (no HTTP, no Redis: what is left is the framework and the layers measured here):

- `no layer`: the app with service.request_context.RequestContext taken out (the baseline);
- `id layer`: as served by default: X-Request-ID, udg_http_responses, tracing off, access log off;
- `+ access log`: UDG_ACCESS_LOG=true, JSON lines written to /dev/null;
- `+ tracing`: tracing on, a server span per request exported through the SDK's batch processor to an
  exporter that drops them (the span work without a network);
- the layer alone around an ASGI app that only answers 200 (less noise: the layer's own cost);

and, for the score path, the stage timer of one request (7 marks and the flush into udg_stage_seconds) with
tracing off and on (on: 7 stage spans). Configurations are interleaved in `rounds` so that a loaded machine
slows all of them alike; the table gives the median and p90 per call and the difference to the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import time
from pathlib import Path


def _apps():
    from service.main import create_app
    from service.request_context import RequestContext
    from service.settings import Settings

    bare = create_app(Settings())
    bare.user_middleware = [m for m in bare.user_middleware if m.cls is not RequestContext]
    layered = create_app(Settings())
    logged = create_app(Settings(access_log=True))
    return bare, layered, logged


async def _empty_app(scope, receive, send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b""})


def _scope() -> dict:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
            "path": "/healthz", "raw_path": b"/healthz", "query_string": b"", "root_path": "",
            "headers": [(b"host", b"127.0.0.1"), (b"user-agent", b"bench"), (b"accept", b"*/*")],
            "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000)}


async def _time_calls(app, count: int) -> list[float]:
    scope = _scope()

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        pass

    samples = []
    clock = time.perf_counter_ns
    for _ in range(count):
        started = clock()
        await app(dict(scope), receive, send)
        samples.append((clock() - started) / 1000)
    return samples


def _time_stage_timer(count: int) -> list[float]:
    from service.scoring import StageTimer

    samples = []
    clock = time.perf_counter_ns
    for _ in range(count):
        started = clock()
        timer = StageTimer(time.perf_counter())
        for stage in ("parse", "encode", "redis", "encode", "model", "respond"):
            timer.mark(stage)
        timer.flush()
        samples.append((clock() - started) / 1000)
    return samples


def run(requests: int, rounds: int) -> list[tuple[str, float, float]]:
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    from service import tracing

    class Drop(SpanExporter):
        def export(self, spans):
            return SpanExportResult.SUCCESS

    access = logging.getLogger("udg.access")
    handler = logging.FileHandler("/dev/null")
    from service.logs import JsonFormatter

    handler.setFormatter(JsonFormatter())
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    access.propagate = False

    from service.request_context import RequestContext

    bare, layered, logged = _apps()
    tracing.configure(processor=BatchSpanProcessor(Drop()))
    configs = [("no layer (baseline)", bare, False), ("id layer (default)", layered, False),
               ("id layer + access log", logged, False), ("id layer + tracing", layered, True),
               ("empty ASGI app (baseline)", _empty_app, False),
               ("id layer on the empty app", RequestContext(_empty_app), False)]
    samples: dict[str, list[float]] = {name: [] for name, _, _ in configs}
    stage: dict[str, list[float]] = {"stage timer, tracing off": [], "stage timer, tracing on": []}
    per_round = max(1, requests // rounds)
    loop = asyncio.new_event_loop()
    try:
        for _name, app, traced in configs:  # warm-up: middleware stacks built, code paths hot
            tracing.ENABLED = traced
            loop.run_until_complete(_time_calls(app, 500))
        for _ in range(rounds):
            for name, app, traced in configs:
                tracing.ENABLED = traced
                samples[name] += loop.run_until_complete(_time_calls(app, per_round))
            for name, traced in (("stage timer, tracing off", False), ("stage timer, tracing on", True)):
                tracing.ENABLED = traced
                server = tracing._STATE["tracer"].start_as_current_span("bench") if traced else None
                if server is not None:
                    with server:
                        stage[name] += _time_stage_timer(per_round)
                else:
                    stage[name] += _time_stage_timer(per_round)
    finally:
        tracing.ENABLED = True
        tracing.shutdown()
        loop.close()
        access.removeHandler(handler)
    rows = []
    for group in (samples, stage):
        for name, values in group.items():
            values.sort()
            rows.append((name, statistics.median(values), values[int(len(values) * 0.9)]))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20000, help="calls per configuration (default 20000)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--out", default=None, help="also write the table (markdown) to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    rows = run(args.requests, args.rounds)
    lines = [f"{args.requests} calls per configuration, {args.rounds} interleaved rounds, in process (ASGI, no "
             f"HTTP); {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end", "",
             f"| {'configuration':<26} | median µs | p90 µs | median − baseline µs |",
             f"|{'-' * 28}|----------:|-------:|---------------------:|"]
    baselines = {name: median for name, median, _ in rows if "baseline" in name or name.endswith("tracing off")}
    base = rows[0][1]
    for name, median, p90 in rows:
        if name in baselines:
            base = baselines[name]
        lines.append(f"| {name:<26} | {median:9.1f} | {p90:6.1f} | {median - base:+20.1f} |")
    print("\n".join(lines))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(f"<!-- written by: python -m loadtest.bench_observability --requests {args.requests} "
                       f"--rounds {args.rounds} --out {args.out} -->\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
