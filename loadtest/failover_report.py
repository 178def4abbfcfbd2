"""The Redis Cluster failover drill's journal as a table, for docs/cluster.md.

    python -m loadtest.failover_report --report docs/results/cluster/failover.json

The drill is the failover test of tests/service/test_cluster.py (`-k killed`). With UDG_FAILOVER_JOURNAL=FILE
it writes its figures to FILE once its assertions have passed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def table(journal: dict) -> str:
    """The journal's figures, one row each (seconds are counted from the SIGKILL)."""
    rows = [
        ("requests sent by 4 client threads (score and event)", f"{journal['requests']:,}"),
        ("failed: score / event", f"{journal['failed_score']:,} / {journal['failed_event']:,}"),
        ("the failures' statuses and error kinds",
         f"{', '.join(map(str, journal['statuses']))} {', '.join(journal['kinds'])}".strip()),
        ("replica promoted, s after the kill", f"{journal['failover_s']:.2f}"),
        ("last score failure, s", f"{journal['last_score_failure_s']:.2f}"),
        ("killed node back as a replica, s", f"{journal['replica_back_s']:.2f}"),
        ("last event failure, s", f"{journal['last_event_failure_s']:.2f}"),
        ("events answered 200, every one found in its user's history", f"{journal['acknowledged_events']:,}"),
        ("cluster-node-timeout; event writes", f"{journal['node_timeout_ms']} ms; {journal['wait']}"),
    ]
    lines = ["| failover drill | figure |", "|---|---:|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", required=True, help="the journal the drill wrote (UDG_FAILOVER_JOURNAL)")
    args = parser.parse_args(argv)
    print(table(json.loads(Path(args.report).read_text())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
