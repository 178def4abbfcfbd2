"""POST /v1/score below FastAPI (`UDG_FAST_SCORE_PATH`, on by default): the outermost ASGI layer answers that
one route itself and hands every other request to the app's own stack.

Why: with the model call at about half of a saturated worker, the layers a score request crossed on its way to
the route (Starlette's error, telemetry and body-limit middlewares, the exception layer, the exit-stack layer,
routing's path matching, FastAPI's dependency solving and Request object) were a measurable share of the rest
(docs/performance.md, "The serving path").

The contract is the route's, because the work is the route's: `service.api.score.parse` and `.answer` (the same
validation, scoring, metrics and stage spans), the same body reader (`receive_body`), the request-id, counting,
access-log and tracing layer (`service.request_context.RequestContext`) around it, and every exception answered
by the handler the app registers for it (`service.errors.HANDLERS`, looked up along the MRO as Starlette does;
a bug's 500 is answered outside the request-id layer and re-raised, as Starlette's ServerErrorMiddleware does).
The route stays declared in FastAPI, so the OpenAPI document does not change; with the setting off it serves.
tests/service/test_fast_score.py compares the two answer by answer.
"""

from __future__ import annotations

import time

from service import errors
from service.api import bodies
from service.api.deps import receive_body
from service.api.score import ROUTE, answer, parse
from service.request_context import RequestContext
from service.scoring import StageTimer

_STARTED = "udg.response_started"  # set in the scope once the 200 is being sent (a bug after it: no 500)
_MEDIA = {media: media.encode("latin-1") for media in bodies.MEDIA_TYPES}


class FastScore:
    def __init__(self, app, stack, access_log: bool = False):
        self.fastapi = app  # its state holds the services once the lifespan ran
        self.app = stack  # the next layer (FastAPI's middleware stack), as middlewares name it
        self.context = RequestContext(self._score, access_log=access_log)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != ROUTE or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        try:
            await self.context(scope, receive, send)
        except Exception as error:
            response = errors.bug_answer(error, "POST", ROUTE)
            if not scope.get(_STARTED):
                await response(scope, receive, send)
            raise

    async def _score(self, scope, receive, send):
        started = time.perf_counter()
        timer = StageTimer(started)
        content_type = accept = version = length = None
        for name, value in scope["headers"]:  # the first of each, as Starlette's Headers.get
            if name == b"content-type":
                content_type = value.decode("latin-1") if content_type is None else content_type
            elif name == b"content-length":
                length = value if length is None else length
            elif name == b"accept":
                accept = value.decode("latin-1") if accept is None else accept
            elif name == b"x-model-version":
                version = value.decode("latin-1") if version is None else version
        try:
            services = self.fastapi.state.services
            media, answer_media = bodies.negotiate(content_type, accept)
            payload = parse(services, await receive_body(receive, length, services.settings.max_body_bytes), media)
            timer.mark("parse")
            content = await answer(services, payload, version, answer_media, timer, started)
        except Exception as error:
            response = errors.handled(error, "POST", ROUTE)
            if response is None:
                raise
            await response(scope, receive, send)
            return
        scope[_STARTED] = True
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"%d" % len(content)), (b"content-type", _MEDIA[answer_media])]})
        await send({"type": "http.response.body", "body": content})
