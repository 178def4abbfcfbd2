"""Container HEALTHCHECK: exit 0 when the service's GET /readyz answers 200, 1 otherwise. Standard library only.

Readiness, not liveness: the container turns healthy once a model version is active and Redis answers, so
compose's `depends_on: condition: service_healthy` (locust) waits for a service that can score.
Environment: UDG_PORT (default 8000), UDG_HEALTHCHECK_URL (overrides the whole URL),
UDG_HEALTHCHECK_TIMEOUT_S (default 2).
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def ready_url() -> str:
    return os.environ.get("UDG_HEALTHCHECK_URL") or f"http://127.0.0.1:{os.environ.get('UDG_PORT', '8000')}/readyz"


def check(url: str, timeout: float) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200, f"{url}: {response.status}"
    except urllib.error.HTTPError as error:
        return False, f"{url}: {error.code} {error.read(200).decode('utf-8', 'replace')}"
    except (OSError, ValueError) as error:
        return False, f"{url}: {error}"


def main() -> int:
    ok, message = check(ready_url(), float(os.environ.get("UDG_HEALTHCHECK_TIMEOUT_S", "2")))
    print(message)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
