"""Rate-limited warning lines: a failure repeated on every request (Redis down: thousands per second) is
logged once per `every_s` per kind, with the count of the lines left out since the last one."""

from __future__ import annotations

import logging
import threading
import time


class RateLimitedLog:
    def __init__(self, logger: logging.Logger, every_s: float = 10.0, clock=time.monotonic):
        self.logger, self.every_s, self.clock = logger, every_s, clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def warning(self, what: str, message: str, *args) -> bool:
        """Log `message % args` unless a line of kind `what` was logged less than `every_s` ago (-> False,
        counted in udg_log_lines_suppressed{what} and reported by the next line)."""
        from service import metrics

        now = self.clock()
        with self._lock:
            last = self._last.get(what)
            if last is not None and now - last < self.every_s:
                self._suppressed[what] = self._suppressed.get(what, 0) + 1
                metrics.LOG_SUPPRESSED.labels(what).inc()
                return False
            self._last[what] = now
            skipped = self._suppressed.pop(what, 0)
        if skipped:
            message += f" (+{skipped} similar in the last %.0f s, not logged)"
            args = (*args, now - last)
        self.logger.warning(message, *args)
        return True
