"""/docs (Swagger UI) and /redoc (ReDoc) render offline: headless Chromium (Debian's `chromium`) loads them
from a real `udg serve` with every other host unreachable (names do not resolve, other addresses go to a
dead proxy), and the rendered DOM holds every operation; the pages reference no other host and the
browser's network log shows no request leaving 127.0.0.1.

`UDG_DOCS_SCREENSHOT=docs/img/api-docs.png pytest tests/service/test_api_docs_offline.py` also writes the screenshot
committed in docs/ (shrunk to a 64-colour palette)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.serve_process import FAST_FOLLOW, ROOT, serve_env, start_serve, stop

OFFLINE_FLAGS = ["--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                 "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=127.0.0.1"]


def chromium() -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    assert binary, "chromium missing: apt-get install chromium (.ci/run installs it)"
    return binary


def browse(url: str, tmp_path: Path, *extra: str) -> tuple[str, list[str]]:
    """-> (the DOM after scripts ran, every URL the page requested: the requests with an initiator; the
    browser's own background requests have none, and fail here like any other host)."""
    net_log = tmp_path / f"net-{len(list(tmp_path.glob('net-*')))}.json"
    done = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--no-first-run", "--disable-background-networking", "--disable-component-update",
                           f"--user-data-dir={tmp_path / 'profile'}", f"--log-net-log={net_log}",
                           "--virtual-time-budget=20000", *OFFLINE_FLAGS, *extra, url],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    log = json.loads(net_log.read_text())
    start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    urls = [event["params"]["url"] for event in log["events"] if event["type"] == start_job
            and event.get("params", {}).get("initiator", "not an origin") != "not an origin"]
    return done.stdout, urls


@pytest.fixture(scope="module")
def docs_service(tmp_path_factory, redis_server, model_repo):
    from service.publish import publish, sync_redis

    client = sync_redis(redis_server.url, timeout_s=5)
    client.flushall()
    publish(model_repo / "v1", client, progress=False)
    tmp = tmp_path_factory.mktemp("docs")
    server, base, _, _ = start_serve(serve_env(redis_server.url, model_repo, tmp, **FAST_FOLLOW), tmp / "serve.log")
    operations = [op["operationId"] for path in httpx.get(base + "/openapi.json").json()["paths"].values()
                  for op in path.values()]
    yield base, operations
    stop(server)


# page, the script it must load, how a rendered operation shows its operationId in the DOM
PAGES = {"swagger-ui": ("/docs", "/docs/assets/swagger/swagger-ui-bundle.js",
                        r'id="operations-[^"]*?-([A-Za-z0-9_]+)"'),
         "redoc": ("/redoc", "/docs/assets/redoc/redoc.standalone.js",
                   r'data-section-id="operation/([A-Za-z0-9_]+)"')}


@pytest.mark.slow
@pytest.mark.parametrize("page", sorted(PAGES))
def test_api_page_renders_every_operation_offline(page, docs_service, tmp_path):
    base, operations = docs_service
    path, script, operation_id = PAGES[page]
    html = httpx.get(base + path).text
    assert not re.findall(r"(?:src|href)=\"(?:https?:)?//", html), "the page references another host"
    dom, urls = browse(base + path, tmp_path, "--dump-dom")
    rendered = set(re.findall(operation_id, dom))
    assert set(operations) <= rendered, sorted(set(operations) - rendered)
    assert "Score candidates for one user" in dom  # a summary, rendered from /openapi.json
    assert {base + "/openapi.json", base + script} <= set(urls)
    assert all(url.startswith(base) for url in urls), [u for u in urls if not u.startswith(base)]
    if page == "swagger-ui" and os.environ.get("UDG_DOCS_SCREENSHOT"):
        screenshot(base, tmp_path, ROOT / os.environ["UDG_DOCS_SCREENSHOT"])


def test_docs_assets_are_installed_with_the_package():
    from service.api.docs import assets_dir

    root = assets_dir()
    for name in ("swagger/swagger-ui-bundle.js", "swagger/swagger-ui.css", "swagger/LICENSE",
                 "redoc/redoc.standalone.js", "redoc/redoc.standalone.js.LICENSE.txt"):
        assert (root / name).stat().st_size > 0, name


def screenshot(base: str, tmp_path: Path, out: Path) -> None:
    from PIL import Image

    raw = tmp_path / "raw.png"
    browse(base + "/docs", tmp_path, f"--screenshot={raw}", "--window-size=1200,900", "--hide-scrollbars")
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.open(raw).convert("RGB").quantize(colors=64).save(out, optimize=True)
    print(json.dumps({"screenshot": str(out), "bytes": out.stat().st_size}))
