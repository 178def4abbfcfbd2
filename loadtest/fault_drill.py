"""Fault drill against real processes: a private redis-server, `udg serve` over HTTP, a published version.

    python -m loadtest.fault_drill --repo MODEL_REPO --version v1 [--unseen 2000]
    python -m loadtest.fault_drill --json docs/results/faults/fault-drill.json   # a small synthetic model
    python -m loadtest.fault_drill --table docs/results/faults/fault-drill.json  # its table, running nothing

1. retries of events with old ts (and of ts-less events by their server-assigned event id): stored once;
2. `--unseen` score calls with new ids and a profile: generated state gets a TTL, the per-window cap holds;
3. while a client scores a known user every ~5 ms: Redis SIGKILL, restarted EMPTY on the same port; then the
   version is republished (the service is not restarted). Measured: requests, answers by status and error
   kind, time to detect (restart -> first 503 state_lost), time to recover (republish done -> first 200),
   cold-start answers served to the known user (must be 0), the routing after the wipe, the known user's
   history after the republish (clicks received during the loss + the published snapshot).
Prints a table (docs/faults.md includes the committed journal's) and returns the figures
(tests/service/test_faults_state.py asserts them). Without --repo it drills a small synthetic model trained once in
--workdir (as `udg loadtest` and the rolling-restart drill do).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx


def _figures_table(f: dict) -> str:
    rows = [("score requests during the drill", f["requests"]),
            ("answers by status / kind", ", ".join(f"{k}: {v}" for k, v in sorted(f["by_status"].items()))),
            ("cold-start answers to the known user", f["cold_served"]),
            ("time to detect (restart -> first 503 state_lost)", f"{f['detect_s'] * 1000:.0f} ms"),
            ("time to recover (republish done -> first 200)", f"{f['recover_s'] * 1000:.0f} ms"),
            ("republish of the version", f"{f['republish_s']:.2f} s"),
            ("routing after the wipe (active)", f["routing_active"]),
            ("clicks received during the loss, kept after republish", f"{f['live_kept']}/{f['live_sent']}"),
            ("published snapshot entries restored under them", f["snapshot_restored"]),
            ("data lost (clicks between publish and the kill)", f["clicks_lost"]),
            ("old-ts events sent twice / stored", f"{f['old_events']} / {f['old_stored']}"),
            ("ts-less retries by event_id stored twice", f["event_id_dups"]),
            ("unseen users scored / written back / capped", f"{f['unseen']} / {f['generated']} / {f['capped']}"),
            ("generated keys without a TTL", f["no_ttl"])]
    width = max(len(r[0]) for r in rows)
    lines = [f"| {'figure':<{width}} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {name:<{width}} | {value} |" for name, value in rows]
    return "\n".join(lines)


def drill(version_dir: Path, unseen: int = 2000, generated_cap: int = 500, log_path: Path | None = None) -> dict:
    import numpy as np

    from loadtest.stack import start_redis, start_service, stop
    from repository import USERS_FILE
    from service.publish import publish, sync_redis
    from service.redis_layout import RedisLayout

    version_dir = Path(version_dir)
    version = version_dir.name
    with np.load(version_dir / USERS_FILE, allow_pickle=False) as users:
        known = str(users["user_ids"][int(np.argmax(users["history_len"]))])  # a known user with a history
        profile_field = str(users["profile_fields"][0])
    items = [f"i{i}" for i in range(1, 9)]
    layout = RedisLayout()
    redis = start_redis()
    state = tempfile.mkdtemp(prefix="udg-drill-")
    process = None
    try:
        client = sync_redis(redis.url, timeout_s=5)
        publish(version_dir, client, progress=False)
        process, base = start_service(version_dir, redis.url, workers=1, log_path=log_path, extra_env={
            "UDG_ROUTING_FILE": str(Path(state) / "routing.json"), "UDG_GENERATED_CAP": str(generated_cap),
            "UDG_CONTROL_POLL_S": "0.2", "UDG_ACTIVATION_RETRY_S": "0.2"})
        http = httpx.Client(base_url=base, timeout=5)
        figures: dict = {}

        # 1. exactly once at any ts
        old = [{"user_id": "late", "item_id": items[i % 8], "clicked": True, "ts": 1000 + i} for i in range(300)]
        for _ in range(2):
            for start in range(0, len(old), 100):
                http.post("/v1/events/batch", json={"events": old[start:start + 100]}).raise_for_status()
        newer = [{"user_id": "late", "item_id": "i1", "clicked": True, "ts": 10**9 + i} for i in range(300)]
        http.post("/v1/events/batch", json={"events": newer}).raise_for_status()
        again = http.post("/v1/events/batch", json={"events": old[:100]}).json()  # oldest ts, after newer ones
        figures["old_events"] = 300
        figures["old_stored"] = 300 + (again["appended"])
        first = http.post("/v1/events", json={"user_id": "anon", "item_id": "i2", "clicked": True}).json()
        retry = http.post("/v1/events", json={"user_id": "anon", "item_id": "i2", "clicked": True,
                                              "event_id": first["event_ids"][0]}).json()
        figures["event_id_dups"] = retry["appended"]

        # 2. unseen users: TTL and cap
        for i in range(unseen):
            http.post("/v1/score", json={"user_id": f"new-{i}", "candidates": items[:3],
                                         "profile": {profile_field: "x"}}).raise_for_status()
        time.sleep(0.5)  # write-backs run after the responses
        keys = list(client.scan_iter(match=layout.embeddings(version, "new-*"), count=10_000))
        ttls = [client.ttl(k) for k in keys]
        figures.update(unseen=unseen, generated=len(keys), capped=unseen - len(keys),
                       no_ttl=sum(1 for t in ttls if t < 0))

        # 3. kill -9 and restart empty under load
        http.post("/v1/events", json={"user_id": known, "item_id": "i7", "clicked": True, "ts": 5}).raise_for_status()
        figures["clicks_lost"] = 1  # the click above was only in Redis
        log: list[tuple[float, int, str | None, bool]] = []
        stop_load = threading.Event()

        def load():
            with httpx.Client(base_url=base, timeout=5) as h:
                while not stop_load.is_set():
                    try:
                        r = h.post("/v1/score", json={"user_id": known, "candidates": items})
                        body = r.json()
                        log.append((time.monotonic(), r.status_code, body.get("error"), bool(body.get("cold_start"))))
                    except httpx.HTTPError as error:
                        log.append((time.monotonic(), 0, type(error).__name__, False))
                    time.sleep(0.005)

        thread = threading.Thread(target=load, daemon=True)
        thread.start()
        time.sleep(0.5)
        os.kill(redis.process.pid, signal.SIGKILL)
        redis.process.wait(5)
        redis.process = None
        time.sleep(0.3)
        redis.start()
        restarted = time.monotonic()
        time.sleep(1.0)
        ready = http.get("/readyz").json()
        figures["ready_reasons"] = ready["reasons"]
        figures["metric_state_lost"] = next((line for line in http.get("/metrics").text.splitlines()
                                             if line.startswith("udg_state_lost ")), "")
        client = sync_redis(redis.url, timeout_s=5)
        live = [{"user_id": known, "item_id": f"i{j}", "clicked": True, "ts": 100 + j} for j in (3, 4)]
        http.post("/v1/events/batch", json={"events": live}).raise_for_status()
        routing = json.loads(client.get("udg:{ctl}:routing") or b"{}")
        figures["routing_active"] = routing.get("active")
        started = time.monotonic()
        publish(version_dir, client, progress=False)
        published = time.monotonic()
        figures["republish_s"] = published - started
        deadline = published + 10
        while time.monotonic() < deadline and not any(t > published and s == 200 for t, s, _, _ in log):
            time.sleep(0.01)
        time.sleep(0.2)
        stop_load.set()
        thread.join(5)
        by_status = collections.Counter(f"{s}" + (f" {k}" if k else "") for _, s, k, _ in log)
        after_kill = [(t, s, k, c) for t, s, k, c in log if t >= restarted]
        first_lost = next((t for t, s, k, _ in after_kill if k == "state_lost"), None)
        first_ok = next((t for t, s, _, _ in log if t > published and s == 200), None)
        history = layout.split_entries(client.get(layout.history(known)))
        figures.update(requests=len(log), by_status=dict(by_status),
                       cold_served=sum(1 for t, s, _, c in log if s == 200 and c),
                       detect_s=(first_lost - restarted) if first_lost else float("nan"),
                       recover_s=(first_ok - published) if first_ok else float("nan"),
                       live_sent=len(live), live_kept=sum(1 for item, is_live in history if is_live),
                       snapshot_restored=sum(1 for _, is_live in history if not is_live),
                       history_head=[item for item, _ in history[:3]])
        return figures
    finally:
        stop(process)
        redis.cleanup()


def render(journal: dict) -> str:
    """The figures' table, closed by the machine's load, from a journal written by --json."""
    before, after = journal["load_average_before_after"]
    table = _figures_table(journal["figures"])
    width = table.index(" | value |") - 2
    load = f"load average before / after the drill ({journal['cpus']} CPUs)"
    return (f"{table}\n| {load:<{width}} | {before:.1f} / {after:.1f} |\n\n"
            f"Model: {journal['model']}; run at {journal['at']}.")


def main(argv: list[str] | None = None) -> int:
    from loadtest.stack import add_model_arguments, ensure_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--unseen", type=int, default=2000)
    parser.add_argument("--generated-cap", type=int, default=500)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here (a journal)")
    parser.add_argument("--table", type=Path, default=None, metavar="JOURNAL",
                        help="print the table of a journal written by --json, run nothing")
    args = parser.parse_args(argv)
    if args.table:
        print(render(json.loads(args.table.read_text())))
        return 0
    version_dir = ensure_model(args.repo, args.version, args.workdir)
    load_before = os.getloadavg()[0]
    figures = drill(version_dir, args.unseen, args.generated_cap)
    journal = {"command": " ".join(["python -m loadtest.fault_drill", *(argv if argv is not None else sys.argv[1:])]),
               "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpus": os.cpu_count(),
               "load_average_before_after": [load_before, os.getloadavg()[0]],
               "model": "the synthetic model `udg loadtest` trains" if args.repo is None else str(version_dir),
               "figures": figures}
    print(render(journal))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(journal, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
