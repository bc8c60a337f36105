"""The HTTP side of the server (aiohttp, on the gRPC server's event loop, over the same engine): the
playground page at `/`, its JSON and server-sent-event endpoints under `/api/`, and the KServe V2 REST
routes under `/v2/` (server/v2/rest.py).

rnnserve serve --repo model_repo --http-port 8080   # then open http://127.0.0.1:8080/

The playground endpoints (JSON in, JSON out; errors are `{"error": {"code", "message"}}` with the HTTP
status of `HTTP_STATUS`):

    GET    /api/models                   models the caller may use: name, version, task, labels, streams
    POST   /api/sessions                 {"model", "version"?} -> the new session (id, model, task, labels)
    DELETE /api/sessions/{id}            close it -> {"position"}
    POST   /api/feed                     {"session_id", "text"} -> position, and for a classifier the class
                                         probabilities of the text so far (a language model: the next
                                         token's top candidates)
    POST   /api/classify                 {"model", "text"} -> class probabilities (whole-text classifiers)
    POST   /api/generate                 {"session_id", "prompt"?, "max_tokens", "temperature", "top_k",
                                         "top_p", "seed"?} -> text/event-stream: one `tokens` event per
                                         batch of tokens ({"text", "token_ids", "position",
                                         "finish_reason"}), then `done`; an error after the stream began
                                         is an `error` event. An error found before it begins (a bad
                                         parameter, an unknown session) is a plain JSON error answer.

With authentication on (server/auth.py), every `/api/` and `/v2/` route except `/v2/health/...` needs
`Authorization: Bearer <token>`, checked by the gRPC side's token store: the same tokens, models and
limits. The page and its files are open (they hold nothing but the page).
"""

from __future__ import annotations

import json
import logging
import math
import ssl
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from pathlib import Path
from typing import Any, cast

import grpc
from aiohttp import web
from aiohttp.typedefs import Middleware

from rnnserve.server.auth import TokenStore
from rnnserve.server.caller import CALLER, current_caller
from rnnserve.server.engine import Engine, GeneratedToken, GenerateRequest
from rnnserve.server.errors import InvalidArgument, ServingError
from rnnserve.server.quoting import cap_message
from rnnserve.server.repository import LoadedModel
from rnnserve.server.sampling import SamplingParams
from rnnserve.server.sessions import Session
from rnnserve.server.v2.rest import add_routes

log = logging.getLogger(__name__)

PLAYGROUND = Path(__file__).resolve().parent / "playground"  # package data (pyproject: package-data)
MAX_BODY_BYTES = 1024 * 1024  # a JSON request body (prompts and reviews are far smaller)
TOKENS_PER_EVENT = 8  # the most tokens one server-sent event carries (fewer when fewer are ready)
# Routes that need a bearer token when authentication is on (prefixes), and those that never do.
AUTH_PREFIXES = ("/api/", "/v2")
OPEN_PREFIXES = ("/v2/health/",)

# The one mapping from the engine's gRPC codes to HTTP statuses (Google's API design guide's table).
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def http_status(error: ServingError) -> int:
    """The HTTP status of an engine error (500 for a code the table lacks, INTERNAL among them)."""
    return HTTP_STATUS.get(error.code, 500)


def error_body(error: ServingError) -> dict[str, Any]:
    return {"error": {"code": error.code.name, "message": cap_message(str(error))}}


def error_response(error: ServingError) -> web.Response:
    """A JSON answer for an engine error: `{"error": {"code": "INVALID_ARGUMENT", "message": ...}}`."""
    response = web.json_response(error_body(error), status=http_status(error))
    if error.code == grpc.StatusCode.UNAUTHENTICATED:
        response.headers["WWW-Authenticate"] = "Bearer"
    return response


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def serving_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Engine errors raised by a handler become JSON answers with their HTTP status."""
    try:
        return await handler(request)
    except ServingError as exc:
        return error_response(exc)


def auth_middleware(store: TokenStore) -> Middleware:
    """Authenticate `/api/` and `/v2/` requests with the gRPC side's token store; the caller is set
    (`CALLER`) while the handler runs, so the engine applies the token's models and limits."""

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if not path.startswith(AUTH_PREFIXES) or path.startswith(OPEN_PREFIXES):
            return await handler(request)
        header = request.headers.get("Authorization")
        caller = store.authenticate([] if header is None else [("authorization", header)])
        reset = CALLER.set(caller)
        try:
            return await handler(request)
        finally:
            CALLER.reset(reset)

    return authenticate


# -- helpers -----------------------------------------------------------------------------------------


async def json_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object; InvalidArgument when it is not one."""
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument("the request body must be a JSON object") from None
    if not isinstance(body, dict):
        raise InvalidArgument("the request body must be a JSON object")
    return body


def field(body: dict[str, Any], name: str, kind: type, default: Any = None) -> Any:
    """body[name] checked to be of `kind` (an int is a float too; a bool is no number); the default
    when it is absent or null; InvalidArgument otherwise."""
    value = body.get(name)
    if value is None:
        if default is None:
            raise InvalidArgument(f"{name} is required")
        return default
    kinds: tuple[type, ...] = (int, float) if kind is float else (kind,)
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kinds):
        raise InvalidArgument(f"{name} must be a {'number' if kind is float else kind.__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidArgument(f"{name} must be a finite number")
    return value


def model_json(model: LoadedModel, latest: bool) -> dict[str, Any]:
    m = model.manifest
    return {
        "name": m.name,
        "version": m.version,
        "latest": latest,
        "task": m.task,
        "labels": list(m.labels),
        "streams": m.streams,
        "classifier_mode": m.classifier_mode,
        "cell": m.cell,
        "vocab_size": m.vocab_size,
    }


def session_json(session: Session) -> dict[str, Any]:
    m = session.model.manifest
    return {
        "session_id": session.id,
        "model": m.name,
        "version": m.version,
        "task": m.task,
        "labels": list(m.labels),
        "position": session.position,
    }


def tokens_json(tokens: list[GeneratedToken]) -> dict[str, Any]:
    last = tokens[-1]
    return {
        "text": "".join(t.text for t in tokens),
        "token_ids": [t.token_id for t in tokens],
        "position": last.position,
        "finish_reason": last.finish_reason or "",
    }


def sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


# -- handlers ----------------------------------------------------------------------------------------


class Playground:
    """The playground's endpoints over one engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(PLAYGROUND / "index.html", headers={"Cache-Control": "no-cache"})

    async def models(self, request: web.Request) -> web.Response:
        caller = current_caller()
        return web.json_response(
            {
                "models": [
                    model_json(m, latest)
                    for m, latest in self.engine.repository.all()
                    if caller.may_use(m.manifest.name)
                ]
            }
        )

    async def open_session(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        session = await self.engine.keeper.open(field(body, "model", str), field(body, "version", str, ""))
        return web.json_response(session_json(session), status=201)

    async def close_session(self, request: web.Request) -> web.Response:
        position = await self.engine.keeper.close(request.match_info["session_id"])
        return web.json_response({"position": position})

    async def feed(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        result = await self.engine.feed(field(body, "session_id", str), field(body, "text", str))
        answer: dict[str, Any] = {"position": result.position, "token_ids": result.token_ids}
        if result.classification is not None:
            answer["label"] = result.classification.label
            answer["probs"] = result.classification.probs
        else:
            answer["top"] = [
                {"token_id": token_id, "text": text, "logprob": logprob}
                for token_id, text, logprob in result.top
            ]
        return web.json_response(answer)

    async def classify(self, request: web.Request) -> web.Response:
        body = await json_body(request)
        model, results = await self.engine.classify(
            field(body, "model", str), field(body, "version", str, ""), [field(body, "text", str)]
        )
        return web.json_response(
            {
                "model": model.manifest.name,
                "labels": list(model.manifest.labels),
                "label": results[0].label,
                "probs": results[0].probs,
            }
        )

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await json_body(request)
        seed = body.get("seed")
        params = GenerateRequest(
            sampling=SamplingParams(
                temperature=float(field(body, "temperature", float, 0.0)),
                top_k=field(body, "top_k", int, 0),
                top_p=float(field(body, "top_p", float, 1.0)),
                seed=None if seed is None else field(body, "seed", int),
            ),
            max_tokens=field(body, "max_tokens", int, 64),
            prompt=field(body, "prompt", str, "") or None,
            max_tokens_per_message=TOKENS_PER_EVENT,
        )
        made = self.engine.generate(field(body, "session_id", str), params)  # an async generator
        async with aclosing(cast(AsyncGenerator[list[GeneratedToken], None], made)) as batches:
            # The first batch before the answer starts: an error found up to then (a bad parameter, an
            # unknown session, a classifier) is a plain JSON error with its status (the middleware).
            first = await anext(batches, None)
            response = web.StreamResponse(
                headers={
                    "Content-Type": "text/event-stream",
                    "Cache-Control": "no-cache",
                    "X-Accel-Buffering": "no",  # a proxy in front (nginx) passes events on at once
                }
            )
            await response.prepare(request)
            last: GeneratedToken | None = None
            try:
                if first is not None:
                    await response.write(sse("tokens", tokens_json(first)))
                    last = first[-1]
                async for tokens in batches:
                    await response.write(sse("tokens", tokens_json(tokens)))
                    last = tokens[-1]
                done = {"position": -1, "finish_reason": ""}
                if last is not None:
                    done = {"position": last.position, "finish_reason": last.finish_reason or ""}
                await response.write(sse("done", done))
            except ServingError as exc:  # after the stream began: an event says so
                await response.write(sse("error", error_body(exc)["error"]))
            except ConnectionError:  # the page went away: aclosing ends the generation
                log.debug("playground: generate stream closed by the client")
            return response


def build_app(engine: Engine, auth: TokenStore | None = None) -> web.Application:
    """The HTTP application: the playground (page and `/api/`) and the V2 REST routes, over `engine`;
    `auth`: the token store requests are checked against (None: authentication off)."""
    middlewares: list[Middleware] = [serving_errors]
    if auth is not None:
        middlewares.append(auth_middleware(auth))  # inside serving_errors: UNAUTHENTICATED maps to 401
    app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY_BYTES)
    playground = Playground(engine)
    app.router.add_get("/", playground.index)
    app.router.add_static("/playground/", PLAYGROUND, show_index=False)
    app.router.add_get("/api/models", playground.models)
    app.router.add_post("/api/sessions", playground.open_session)
    app.router.add_delete("/api/sessions/{session_id}", playground.close_session)
    app.router.add_post("/api/feed", playground.feed)
    app.router.add_post("/api/classify", playground.classify)
    app.router.add_post("/api/generate", playground.generate)
    add_v2_routes(app, engine)
    return app


def add_v2_routes(app: web.Application, engine: Engine) -> None:
    """The KServe V2 REST routes (server/v2/rest.py)."""
    add_routes(app, engine)


class HttpServer:
    """The HTTP application served on host:port, on the running event loop."""

    def __init__(self, app: web.Application, shutdown_timeout: float) -> None:
        # No access log of aiohttp's own: the server's logs are its own (logs.py).
        self._runner = web.AppRunner(app, shutdown_timeout=shutdown_timeout, access_log=None)
        self.port = 0

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> int:
        """Listen on host:port (HTTPS with `ssl_context`); returns the bound port."""
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=ssl_context)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise OSError(
                f"could not serve HTTP on {host}:{port} ({exc.strerror}); pick another --http-port "
                "(0 = any free port, -1 = no HTTP)"
            ) from exc
        self.port = int(self._runner.addresses[0][1])  # the bound port (when 0 was asked for)
        log.info("HTTP (playground, /v2 REST) on http://%s:%d/", host, self.port)
        return self.port

    async def stop(self) -> None:
        """Stop listening, let requests in flight end (up to the shutdown timeout), then close."""
        await self._runner.cleanup()
