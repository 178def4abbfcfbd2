"""HTTP limits drill: oversized heads, slowloris, slow bodies, oversized bodies, the connection cap — against
a real `udg serve` over 127.0.0.1 sockets; prints a Markdown table (docs/faults.md, "HTTP limits").

    python -m loadtest.http_drill                      # starts its own `udg serve` (see START_ENV), then stops it
    python -m loadtest.http_drill --url http://127.0.0.1:8000 --pid PID   # a running one (PID: for its memory)
    python -m loadtest.http_drill --json docs/results/faults/http-drill.json   # also keep the journal
    python -m loadtest.http_drill --table docs/results/faults/http-drill.json  # its table, running nothing

Without --url it serves a model repository with no version and an unreachable Redis: every limit here acts
before a request reaches a model, and /healthz answers. The functions are reused by tests/service/test_http_limits.py.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
MB = 1 << 20
# The limits the drill's own server runs with: short timeouts so the drill is quick; the rest at defaults.
START_ENV = {"UDG_HTTP_HEADER_TIMEOUT_S": "2", "UDG_HTTP_BODY_TIMEOUT_S": "3", "UDG_HTTP_MAX_CONNECTIONS": "200",
             "UDG_WORKERS": "1"}


# --- clients ---------------------------------------------------------------------------------------------
def parse_status(data: bytes) -> int | None:
    if data.startswith(b"HTTP/1.1 ") and len(data) >= 12:
        return int(data[9:12])
    return None


def read_answer(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything the server sends until it closes (or `timeout`); b'' if it closed/reset without a byte."""
    sock.settimeout(timeout)
    chunks = []
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    except (ConnectionResetError, TimeoutError, OSError):
        pass
    return b"".join(chunks)


def raw_exchange(host: str, port: int, head: bytes, body: bytes = b"", chunk: int = 256 * 1024,
                 timeout: float = 10.0) -> tuple[int | None, bytes, str]:
    """Send head + body the way a naive client does (all of it, then read). -> (status, answer, how it ended)."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        data = head + body
        ended = "sent all"
        try:
            view = memoryview(data)
            for start in range(0, len(data), chunk):
                sock.sendall(view[start:start + chunk])
        except (BrokenPipeError, ConnectionResetError) as error:
            ended = f"send: {type(error).__name__}"
        answer = read_answer(sock, timeout)
        return parse_status(answer), answer, ended


def post_head(path: str, length: int, extra: bytes = b"", connection: bytes = b"close") -> bytes:
    return (b"POST " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + extra + b"Connection: " + connection + b"\r\nContent-Length: %d\r\n\r\n" % length)


def json_body(size: int) -> bytes:
    """A JSON score request of exactly `size` bytes (an over-long user id)."""
    shell = b'{"user_id": "", "candidates": ["a"]}'
    return shell[:13] + b"u" * (size - len(shell)) + shell[13:]


def urllib_post(url: str, body: bytes, timeout: float = 20.0) -> str:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return str(response.status)
    except urllib.error.HTTPError as error:
        return f"{error.code} {json.loads(error.read()).get('error')}"
    except (urllib.error.URLError, OSError) as error:
        return f"error: {type(getattr(error, 'reason', error)).__name__}"


def httpx_post(url: str, body: bytes, timeout: float = 20.0) -> str:
    import httpx

    try:
        reply = httpx.post(url, content=body, headers={"Content-Type": "application/json"}, timeout=timeout)
        return f"{reply.status_code} {reply.json().get('error')}"
    except httpx.HTTPError as error:
        return f"error: {type(error).__name__}"


def requests_post(url: str, body: bytes, timeout: float = 20.0) -> str:
    try:
        import requests
    except ImportError:
        return "n/a (requests not installed)"
    try:
        reply = requests.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=timeout)
        return f"{reply.status_code} {reply.json().get('error')}"
    except requests.RequestException as error:
        return f"error: {type(error).__name__}"


def raw_post(host: str, port: int, path: str, body: bytes) -> str:
    status, answer, ended = raw_exchange(host, port, post_head(path, len(body)), body)
    if status is None:
        return f"no answer ({ended})"
    kind = json.loads(answer.split(b"\r\n\r\n", 1)[1]).get("error")
    return f"{status} {kind}"


def slowloris(host: str, port: int, connections: int, interval_s: float = 0.5,
              give_up_s: float = 30.0) -> list[float]:
    """`connections` clients that send a header byte every `interval_s`, never ending the head.
    -> seconds until the server closed each (give_up_s where it did not)."""
    def one(_):
        started = time.monotonic()
        try:
            sock = socket.create_connection((host, port), timeout=5)
        except OSError:
            return 0.0
        with sock:
            try:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
                sock.settimeout(interval_s)
                while time.monotonic() - started < give_up_s:
                    try:
                        if sock.recv(4096) == b"":
                            break
                        # an answer (408): keep reading until the close
                    except TimeoutError:
                        sock.sendall(b"a")
            except OSError:
                pass
        return time.monotonic() - started

    with concurrent.futures.ThreadPoolExecutor(connections) as pool:
        return list(pool.map(one, range(connections)))


def idle_connections(host: str, port: int, connections: int, give_up_s: float = 30.0) -> list[float]:
    """Connections that never send a byte -> seconds until the server closed each."""
    socks = [socket.create_connection((host, port), timeout=5) for _ in range(connections)]
    started = time.monotonic()
    closed = []
    for sock in socks:
        sock.settimeout(max(0.01, give_up_s - (time.monotonic() - started)))
        with contextlib.suppress(OSError):
            sock.recv(1)
        closed.append(time.monotonic() - started)
        sock.close()
    return closed


def slow_body(host: str, port: int, interval_s: float = 0.5, give_up_s: float = 30.0) -> tuple[int | None, float]:
    """Headers of a 1000-byte body, then one byte every interval_s. -> (status answered, seconds to close)."""
    started = time.monotonic()
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(post_head("/v1/score", 1000))
        sock.settimeout(interval_s)
        answer = b""
        while time.monotonic() - started < give_up_s:
            try:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                answer += chunk
            except TimeoutError:
                try:
                    sock.sendall(b" ")
                except OSError:
                    break
            except OSError:
                break
        return parse_status(answer), time.monotonic() - started


def connection_cap(host: str, port: int, limit: int, extra: int = 5) -> tuple[int, list[int | None]]:
    """Open `limit` idle connections, then `extra` more that each send a request. -> (held, their statuses)."""
    held = [socket.create_connection((host, port), timeout=5) for _ in range(limit)]
    try:
        statuses = []
        for _ in range(extra):
            status, _, _ = raw_exchange(host, port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", timeout=5)
            statuses.append(status)
        return len(held), statuses
    finally:
        for sock in held:
            sock.close()


# --- server memory ---------------------------------------------------------------------------------------
def process_tree(pid: int) -> list[int]:
    pids = [pid]
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            children = Path(f"/proc/{pid}/task/{task}/children").read_text().split()
            for child in children:
                pids += process_tree(int(child))
    except OSError:
        pass
    return pids


def rss_mb(pid: int) -> float:
    """The largest resident set among the server process and its children (the workers), MiB."""
    best = 0.0
    for one in process_tree(pid):
        try:
            for line in Path(f"/proc/{one}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    best = max(best, int(line.split()[1]) / 1024)
        except OSError:
            pass
    return best


# --- the drill -------------------------------------------------------------------------------------------
def server_env(env_extra: dict | None = None) -> dict[str, str]:
    """The drill server's environment (no port): an empty model repository and an unreachable Redis."""
    repo = tempfile.mkdtemp(prefix="udg-drill-repo-")
    env = {**os.environ, "UDG_MODEL_REPO": repo, "REDIS_URL": "redis://127.0.0.1:1/0", "UDG_LOG_LEVEL": "warning",
           **START_ENV, **(env_extra or {})}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def start_server(port: int, env_extra: dict | None = None, log_path: Path | None = None) -> subprocess.Popen:
    """`udg serve` on `port` with START_ENV (and `env_extra`); its log lines go to `log_path` (else dropped)."""
    env = {**server_env(env_extra), "UDG_PORT": str(port)}
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 - the child holds it
    try:
        return subprocess.Popen([sys.executable, "-m", "udg_cli", "serve"], env=env, cwd=ROOT,
                                stdout=log, stderr=log)
    finally:
        if log_path:
            log.close()


def drill(base: str, pid: int | None, limits: dict) -> list[tuple[str, str, str]]:
    parts = urlsplit(base)
    host, port = parts.hostname, parts.port
    score = base + "/v1/score"
    rows = []

    def row(check, result, expected):
        rows.append((check, result, expected))
        print(f"  {check}: {result}", file=sys.stderr, flush=True)

    get = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    status, _, _ = raw_exchange(host, port, get + b"X-Big: " + b"a" * 40_000 + b"\r\n\r\n")
    row("header of 40 KB (raw socket)", f"{status}", "431")
    status, _, _ = raw_exchange(host, port, get + b"".join(b"X-%d: 1\r\n" % i for i in range(150)) + b"\r\n")
    row("150 header fields (raw socket)", f"{status}", "431")

    before = rss_mb(pid) if pid else None
    started = time.monotonic()
    status, _, ended = raw_exchange(host, port, get + b"X-Big: " + b"a" * (32 * MB) + b"\r\n\r\n")
    row("header of 32 MB (raw socket)", f"{status} ({ended}) in {time.monotonic() - started:.2f} s", "431 or reset")

    def huge(_):
        return raw_exchange(host, port, get + b"X-Big: " + b"a" * (128 * MB) + b"\r\n\r\n")[0]

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(huge, range(4)))
    after = rss_mb(pid) if pid else None
    memory = f"; worker RSS {before:.0f} -> {after:.0f} MiB" if pid else ""
    row("4 concurrent headers of 128 MB", f"{statuses}{memory}", "bounded RSS")

    timeout = limits["header_timeout_s"]
    closed = slowloris(host, port, 100, give_up_s=timeout + 15)
    row("100 slowloris connections (1 header byte / 0.5 s)",
        f"all closed after {min(closed):.1f}-{max(closed):.1f} s", f"closed at ~{timeout:g} s")
    closed = idle_connections(host, port, 50, give_up_s=timeout + 15)
    row("50 idle connections (no byte sent)", f"all closed after {min(closed):.1f}-{max(closed):.1f} s",
        f"closed at ~{timeout:g} s")
    status, seconds = slow_body(host, port, give_up_s=limits["body_timeout_s"] + 15)
    row("slow body (1 byte / 0.5 s)", f"{status} after {seconds:.1f} s", f"408 at ~{limits['body_timeout_s']:g} s")

    for mb in (1, 2, 8, 32):
        body = json_body(mb * MB + 1)  # 1 MiB + 1 byte: just over the default UDG_MAX_BODY_BYTES
        row(f"body {mb} MiB + 1 B: urllib / httpx / requests / raw socket",
            " / ".join([urllib_post(score, body), httpx_post(score, body), requests_post(score, body),
                        raw_post(host, port, "/v1/score", body)]), "413 body_too_large"
            + (" (or a reset: over the drain bound)" if mb * MB > limits["drain_bytes"] else ""))

    held, statuses = connection_cap(host, port, limits["max_connections"])
    row(f"{held} open connections + 5 requests on new ones", f"{statuses}", "503 overloaded")
    return rows


def render(journal: dict) -> str:
    """The drill's table, from a run's figures or its journal."""
    lines = [f"`udg serve` limits: {journal['limits']}", "", "| check | result | expected |", "|---|---|---|"]
    lines += [f"| {check} | {result} | {expected} |" for check, result, expected in journal["rows"]]
    if "load_average_before_after" in journal:
        before, after = journal["load_average_before_after"]
        lines += [f"| machine: load average before / after the drill ({journal['cpus']} CPUs) | "
                  f"{before:.1f} / {after:.1f} | (shared machine) |",
                  "", f"Run at {journal['at']}, Python {journal['python']}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=None, help="a running service (default: start one)")
    parser.add_argument("--pid", type=int, default=None, help="its process id (for the worker memory)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here (a journal)")
    parser.add_argument("--table", type=Path, default=None, metavar="JOURNAL",
                        help="print the table of a journal written by --json, run nothing")
    args = parser.parse_args(argv)
    if args.table:
        print(render(json.loads(args.table.read_text())))
        return 0
    from service.local_redis import free_port
    from service.settings import Settings

    load_before = os.getloadavg()[0]
    server = None
    if args.url:
        base, pid, env = args.url.rstrip("/"), args.pid, {}
    else:
        port = free_port()
        server = start_server(port)
        base, pid, env = f"http://127.0.0.1:{port}", server.pid, START_ENV
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(base + "/healthz", timeout=1).read()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the server did not start") from None
                time.sleep(0.2)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        settings = Settings()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    limits = {"header_timeout_s": settings.http_header_timeout_s, "body_timeout_s": settings.http_body_timeout_s,
              "max_connections": settings.http_max_connections, "drain_bytes": settings.http_drain_bytes}
    try:
        rows = drill(base, pid, limits)
    finally:
        if server is not None:
            server.terminate()
            server.wait(20)
    shown = ", ".join(f"{k}={v}" for k, v in env.items()) or "the service's own"
    journal = {"command": " ".join(["python -m loadtest.http_drill",
                                    *(argv if argv is not None else sys.argv[1:])]),
               "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpus": os.cpu_count(),
               "python": platform.python_version(), "load_average_before_after": [load_before, os.getloadavg()[0]],
               "limits": f"{shown}; max_header_bytes={settings.http_max_header_bytes}, "
                         f"max_headers={settings.http_max_headers}, max_body_bytes={settings.max_body_bytes}, "
                         f"drain_bytes={settings.http_drain_bytes}",
               "rows": [list(row) for row in rows]}
    print("\n" + render(journal))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(journal, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
