"""Rate-limited log lines: a failure repeated on every request (Redis down: thousands per second) is logged
once per `every_s` per kind, with the count of the lines left out since the last one.

The count is in the message (`+N similar in the last S s, not logged`) and, for JSON logs, in the fields
`suppressed` and `suppressed_s`; every line left out is also counted in `udg_log_lines_suppressed{what}`.
A burst that ends leaves its count behind: `flush_all()` (called periodically by the service) writes it as
one line once the kind's window has passed without a new line, so the last count of an outage is not lost.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref

MAX_KINDS = 1024  # kinds remembered per instance (a kind may name a route): bounded memory
_INSTANCES: weakref.WeakSet = weakref.WeakSet()


class RateLimitedLog:
    def __init__(self, logger: logging.Logger, every_s: float = 10.0, clock=time.monotonic):
        self.logger, self.every_s, self.clock = logger, every_s, clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, tuple[int, int, str]] = {}  # what -> (count, level, message of the last)
        self._lock = threading.Lock()
        _INSTANCES.add(self)

    def warning(self, what: str, message: str, *args) -> bool:
        """Log `message % args` unless a line of kind `what` was logged less than `every_s` ago (-> False,
        counted in udg_log_lines_suppressed{what} and reported by the next line)."""
        return self.log(logging.WARNING, what, message, *args)

    def error(self, what: str, message: str, *args, exc_info=None) -> bool:
        return self.log(logging.ERROR, what, message, *args, exc_info=exc_info)

    def log(self, level: int, what: str, message: str, *args, exc_info=None, extra: dict | None = None) -> bool:
        from service import metrics

        now = self.clock()
        with self._lock:
            last = self._last.get(what)
            if last is not None and now - last < self.every_s:
                count = self._suppressed.get(what, (0, level, ""))[0] + 1
                self._suppressed[what] = (count, level, message % args if args else message)
                metrics.LOG_SUPPRESSED.labels(what).inc()
                return False
            if last is None and len(self._last) >= MAX_KINDS:
                self._forget_oldest()
            self._last[what] = now
            skipped = self._suppressed.pop(what, (0, level, ""))[0]
        extra = {**(extra or {}), "what": what}
        if skipped:
            message += " (+%d similar in the last %.1f s, not logged)"
            args = (*args, skipped, now - last)
            extra.update(suppressed=skipped, suppressed_s=round(now - last, 3))
        self.logger.log(level, message, *args, exc_info=exc_info, extra=extra)
        return True

    def flush(self) -> int:
        """Write the pending count of each kind whose window has passed (the burst ended); -> lines written."""
        now = self.clock()
        due = []
        with self._lock:
            for what, (count, level, last_message) in list(self._suppressed.items()):
                since = now - self._last.get(what, now)
                if since >= self.every_s:
                    del self._suppressed[what]
                    due.append((what, count, level, last_message, since))
        for what, count, level, last_message, since in due:
            self.logger.log(level, "%d similar lines not logged in the last %.1f s; the last: %s", count, since,
                            last_message, extra={"what": what, "suppressed": count, "suppressed_s": round(since, 3)})
        return len(due)

    def _forget_oldest(self) -> None:
        oldest = min(self._last, key=self._last.__getitem__)
        self._last.pop(oldest)
        self._suppressed.pop(oldest, None)


def set_interval(every_s: float) -> None:
    """The window of every rate-limited log of this process (UDG_LOG_REPEAT_S)."""
    for instance in list(_INSTANCES):
        instance.every_s = every_s


def flush_all() -> int:
    """flush() every rate-limited log of this process."""
    return sum(instance.flush() for instance in list(_INSTANCES))
