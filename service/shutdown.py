"""Graceful shutdown of a worker: on SIGTERM, drain first, then let uvicorn stop.

A load balancer (a Kubernetes Service's endpoints, a proxy that health-checks) learns that an instance is
leaving only from its readiness. So the first SIGTERM does not stop the worker: for `shutdown_drain_s`
seconds /readyz answers 503 (`draining`) while every request is still served, and responses carry
`Connection: close` (service/http_server.py) so that kept-alive clients reconnect, to another instance. Then
the signal goes on to uvicorn's own handler: it stops accepting, lets in-flight requests complete (at most
`shutdown_timeout_s`, uvicorn's graceful-shutdown timeout), runs the app's shutdown and exits. A second
SIGTERM skips what is left of the drain; SIGINT (Ctrl-C) is not delayed.

With `--workers N` uvicorn's supervisor forwards SIGTERM to every worker process; each drains by itself.
Installed from the app's lifespan (service/main.py), which runs in the worker's main thread under uvicorn's
signal handlers; elsewhere (a test client's thread, another server) nothing is installed.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time

log = logging.getLogger("udg.shutdown")


class Drain:
    """This process's drain state: set once, on the first SIGTERM."""

    def __init__(self) -> None:
        self.since: float | None = None  # time.monotonic() of the SIGTERM that began the drain
        self.seconds = 0.0

    @property
    def active(self) -> bool:
        return self.since is not None

    def begin(self, seconds: float) -> None:
        if self.since is None:
            self.since, self.seconds = time.monotonic(), seconds

    def reason(self) -> str:
        left = max(0.0, self.seconds - (time.monotonic() - (self.since or 0.0)))
        return (f"draining: shutting down (SIGTERM); requests are still served for {left:.1f} s more, "
                "then this instance stops accepting")

    def reset(self) -> None:
        self.since, self.seconds = None, 0.0


DRAIN = Drain()


def draining() -> bool:
    return DRAIN.active


def install(drain_s: float, timeout_s: float) -> bool:
    """Wrap the current SIGTERM handler (uvicorn's) with the drain; -> whether it was installed."""
    if drain_s <= 0 or threading.current_thread() is not threading.main_thread():
        return False
    forward = signal.getsignal(signal.SIGTERM)
    if not callable(forward):  # not under uvicorn's handlers: leave the signal alone
        return False
    loop = asyncio.get_running_loop()

    def on_sigterm(sig, frame) -> None:
        if DRAIN.active:  # a second SIGTERM: stop now
            forward(sig, frame)
            return
        DRAIN.begin(drain_s)
        log.warning("SIGTERM: draining for %.1f s (/readyz 503, requests still served), then stop accepting and "
                    "let in-flight requests complete (at most %.0f s)", drain_s, timeout_s)
        loop.call_soon_threadsafe(loop.call_later, drain_s, forward, sig, None)

    signal.signal(signal.SIGTERM, on_sigterm)
    return True
