"""regrad serve: one loaded model answering many concurrent questions, each with its own step.

Three parts:

- ``BatchWorker``: the one thread that owns the model, learner, embedder and bank (a
  ``QueryEngine``, loaded in that thread). Requests queue up; the worker takes whatever arrives
  until no request has come for a short window (at most ten windows, or ``max_batch``) and
  answers it in ONE
  ``QueryEngine.answer_many(requests, return_exceptions=True)`` call: one generation call per
  ``max_new_tokens`` value, every row with its own phi' on the LoRA side path (the answering
  pipeline, ``regrad_cli.online.pipeline``, is the only place that steps, combines and generates). A
  request that fails fails alone; if the whole call raises, each request is retried on its own
  so that only the culprit fails. Other work that touches the engine (bank stats, the deep weight
  hash) runs in the same thread between batches.
- ``create_app``: the FastAPI application (routes, request models with limits, JSON errors that
  name the field, bearer token, body size limit, Prometheus metrics). A streamed chat completion
  gets its text token by token from the worker (``Request.on_text`` -> ``_Stream``), in the same
  batch and with the same step as any other request.
- ``serve`` / ``BackgroundServer``: uvicorn in the foreground (the CLI) or in a thread (tests,
  benchmarks). On shutdown uvicorn stops accepting connections, waits for the requests in flight,
  then the worker drains its queue: no accepted request is lost.

The base weights and phi are never written (the side path reads per-row adapters); the server
hashes both at start-up and ``GET /healthz?deep=1`` re-hashes and compares.
"""


import asyncio
import collections
import concurrent.futures
import hashlib
import hmac
import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from regrad_cli.errors import NoBankError, RegradError

log = logging.getLogger("regrad.serve")

# Request limits (documented in docs/serving.md).
MAX_QUESTION_CHARS = 4000
MAX_BATCH_ITEMS = 64
DEFAULT_MAX_BODY_BYTES = 1 << 20
# A batch waits at most this many batch windows for requests to join it (each arrival restarts
# the window).
BATCH_WAIT_WINDOWS = 10
ROUTES = ("/v1/query", "/v1/query:batch", "/v1/bank/stats", "/v1/chat/completions", "/v1/models",
          "/healthz", "/metrics", "/docs", "/openapi.json")


@dataclass
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = None  # bearer token required on every route but /healthz
    max_batch: int = 16  # most requests answered in one answer_many call
    batch_window_ms: float = 10.0  # how long the worker waits for another request to join a batch
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_queue: int = 1024  # requests waiting beyond this get 503
    # Stalled clients are shed (regrad_cli/online/shedding.py, docs/serving.md).
    header_timeout_s: float = 10.0  # request headers complete within this after connecting
    body_timeout_s: float = 30.0  # request body complete within this after its headers
    keep_alive_s: float = 5.0  # an idle keep-alive connection is closed after this
    max_connections: int = 1000  # open connections (lowered to fit the descriptor limit)
    ready_line: bool = False  # print "regrad serve: ready ..." on stderr once /healthz answers 200
    access_log: bool = False  # one line per request on stderr: method, path, status, milliseconds


class ApiError(Exception):
    """An error answered as {"error": {"type", "message", "field"?}} with an HTTP status."""

    def __init__(self, status: int, type_: str, message: str, field_: str | None = None):
        super().__init__(message)
        self.status, self.type, self.message, self.field = status, type_, message, field_

    def body(self) -> dict:
        err = {"type": self.type, "message": self.message}
        if self.field:
            err["field"] = self.field
        return {"error": err}


def error_of(exc: BaseException) -> ApiError:
    """The HTTP error for an answering failure, by the exception's type: a bad field (FieldError:
    422, naming it), no bank (409), any other RegradError or bank error (500, its message),
    anything else (500, the type only; the traceback goes to the server log)."""
    from regrad_cli.errors import FieldError

    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, NoBankError):
        return ApiError(409, "no_bank", str(exc))
    if isinstance(exc, FieldError):
        return ApiError(422, "invalid_request", str(exc), exc.field)
    if isinstance(exc, RegradError):
        return ApiError(500, "answer_failed", str(exc))
    try:
        from bank_format import BankFormatError

        if isinstance(exc, BankFormatError):
            return ApiError(500, "answer_failed", str(exc))
    except ImportError:  # pragma: no cover
        pass
    return ApiError(500, "internal_error", f"internal error ({type(exc).__name__}); see the server log")


# Weight hashes ---------------------------------------------------------------------------------
def weight_hashes(engine) -> dict[str, str]:
    """sha256 of the base model's weights and of the learner (phi, step sizes, temperature)."""
    return {"base": _hash_state(engine.model.state_dict()), "phi": _hash_state(engine.learner.state_dict())}


def _hash_state(state: dict) -> str:
    from regrad_cli.lm.models import hash_tensor

    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode() + b"\0" + str(state[name].dtype).encode() + b"\0")
        hash_tensor(h, state[name])
    return h.hexdigest()


# Metrics -----------------------------------------------------------------------------------------
class Metrics:
    """Prometheus metrics in a registry of their own (several apps may live in one process)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("regrad_requests", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram("regrad_request_duration_seconds", "HTTP request latency by route",
                                 ["route"], registry=self.registry,
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.batch_size = Histogram("regrad_batch_size", "Requests answered per answer_many call",
                                    registry=self.registry, buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.batch_seconds = Histogram("regrad_batch_duration_seconds", "Time of one answer_many call",
                                       registry=self.registry,
                                       buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.queue_depth = Gauge("regrad_queue_depth", "Requests waiting for the worker",
                                 registry=self.registry)
        self.answers = Counter("regrad_answers", "Answered requests by outcome", ["outcome"],
                               registry=self.registry)

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


# The worker ---------------------------------------------------------------------------------------
class BatchWorker:
    """The thread that owns the QueryEngine and answers queued requests in batches."""

    def __init__(self, load: Callable[[], Any], settings: ServeSettings | None = None,
                 metrics: Metrics | None = None, on_load_error: Callable[[BaseException], None] | None = None):
        self._load = load
        self.settings = settings or ServeSettings()
        self.metrics = metrics or Metrics()
        self._on_load_error = on_load_error
        self.engine = None  # the QueryEngine, once loaded
        self.hashes: dict[str, str] | None = None  # taken once loaded, before any request
        self.load_error: BaseException | None = None
        self.ready = threading.Event()
        self.finished = threading.Event()  # loaded or failed
        self._cond = threading.Condition()
        self._requests: collections.deque = collections.deque()
        self._calls: collections.deque = collections.deque()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="regrad-serve-worker", daemon=True)
        self.batches = 0  # answer_many calls made
        self.accepted = 0  # requests queued so far
        self.answered = 0  # requests whose answer or error has been set

    # Life cycle ------------------------------------------------------------------------------
    def start(self) -> "BatchWorker":
        self._thread.start()
        return self

    def close(self, timeout: float | None = None) -> None:
        """Stop accepting work; everything already queued is answered before the thread ends."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def status(self) -> str:
        if self.load_error is not None:
            return "failed"
        if self._closing:
            return "stopping"
        return "ready" if self.ready.is_set() else "loading"

    # Submitting ------------------------------------------------------------------------------
    def submit(self, request) -> concurrent.futures.Future:
        """Queue one pipeline Request; the future resolves to its answer dict or its error."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            self._check_open()
            if len(self._requests) >= self.settings.max_queue:
                raise ApiError(503, "overloaded", f"{len(self._requests)} requests are waiting; retry later")
            self._requests.append((request, fut))
            self.accepted += 1
            self.metrics.queue_depth.set(len(self._requests))
            self._cond.notify_all()
        return fut

    def call(self, fn: Callable[[Any], Any]) -> concurrent.futures.Future:
        """Run ``fn(query_engine)`` in the worker thread, between batches."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            self._check_open()
            self._calls.append((fn, fut))
            self._cond.notify_all()
        return fut

    def _check_open(self) -> None:
        if self._closing:
            raise ApiError(503, "shutting_down", "the server is shutting down")
        if self.load_error is not None:
            raise ApiError(503, "not_ready", f"loading failed: {self.load_error}")
        if not self.ready.is_set():
            raise ApiError(503, "not_ready", "the model, learner, embedder and bank are still loading")

    # The thread ---------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self.engine = self._load()
            self.hashes = weight_hashes(self.engine.engine)
        except BaseException as exc:  # noqa: BLE001 - reported through /healthz and the CLI
            self.load_error = exc
            log.error("loading failed: %s", exc)
            self.finished.set()
            if self._on_load_error is not None:
                self._on_load_error(exc)
            return
        self.ready.set()
        self.finished.set()
        window = self.settings.batch_window_ms / 1000.0
        max_batch = max(1, self.settings.max_batch)
        while True:
            with self._cond:
                while not self._requests and not self._calls and not self._closing:
                    self._cond.wait()
                if self._calls:
                    job = self._calls.popleft()
                    batch = None
                elif self._requests:
                    # Wait for more requests to join (not when closing: drain fast). Each arrival
                    # restarts the window, up to BATCH_WAIT_WINDOWS windows in all: clients answered
                    # by the last batch send their next questions a few ms apart, and a fixed window
                    # from the first one would split them into a large batch and a straggler batch.
                    now = time.monotonic()
                    cap, deadline, seen = now + BATCH_WAIT_WINDOWS * window, now + window, len(self._requests)
                    while len(self._requests) < max_batch and not self._closing and not self._calls:
                        now = time.monotonic()
                        if len(self._requests) > seen:
                            seen, deadline = len(self._requests), now + window
                        left = min(deadline, cap) - now
                        if left <= 0:
                            break
                        self._cond.wait(left)
                    n = min(max_batch, len(self._requests))
                    batch = [self._requests.popleft() for _ in range(n)]
                    self.metrics.queue_depth.set(len(self._requests))
                else:  # closing with nothing left
                    break
            if batch is None:
                fn, fut = job
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn(self.engine))
                    except BaseException as exc:  # noqa: BLE001
                        fut.set_exception(exc)
                continue
            self._answer(batch)
        # Anything that raced in after the last look (close() was called) still gets an answer.
        for _, fut in list(self._calls):
            if fut.set_running_or_notify_cancel():
                fut.set_exception(ApiError(503, "shutting_down", "the server is shutting down"))

    def _answer(self, batch: list) -> None:
        live = [(req, fut) for req, fut in batch if fut.set_running_or_notify_cancel()]
        if not live:
            return
        reqs = [req for req, _ in live]
        t0 = time.perf_counter()
        try:
            results = self.engine.answer_many(reqs, return_exceptions=True)
        except Exception as exc:  # noqa: BLE001 - the whole call failed: find the culprit
            if len(reqs) == 1:
                results = [exc]
            else:
                log.warning("a batch of %d failed (%s); answering each on its own", len(reqs), exc)
                results = []
                for req in reqs:
                    try:
                        results.append(self.engine.answer_many([req], return_exceptions=True)[0])
                    except Exception as one:  # noqa: BLE001
                        results.append(one)
        self.batches += 1
        self.answered += len(reqs)
        self.metrics.batch_size.observe(len(reqs))
        self.metrics.batch_seconds.observe(time.perf_counter() - t0)
        for (_, fut), res in zip(live, results):
            if isinstance(res, BaseException):
                if not isinstance(res, RegradError):
                    log.error("request failed", exc_info=res)
                self.metrics.answers.labels("error").inc()
                fut.set_exception(res)
            else:
                self.metrics.answers.labels("ok").inc()
                fut.set_result(res)


# The application ------------------------------------------------------------------------------------
def _models():
    """The request models (pydantic), built on first use: limits from the pipeline's bounds."""
    from typing import Literal, Optional, Union

    from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

    from regrad_cli.online.modes import COMBINES, MAX_NEW_TOKENS, MAX_TOP_K, MODES, RETRIEVERS

    ModeT = Literal[tuple(MODES)]  # type: ignore[valid-type]
    RetrieverT = Literal[tuple(RETRIEVERS)]  # type: ignore[valid-type]
    CombineT = Literal[tuple(COMBINES)]  # type: ignore[valid-type]

    class Options(BaseModel):
        """regrad's answering options; omitted ones take the workspace's [query] settings."""

        mode: Optional[ModeT] = None
        top_k: Optional[StrictInt] = Field(None, ge=0, le=MAX_TOP_K)
        gamma: Optional[float] = Field(None, ge=-100.0, le=100.0, allow_inf_nan=False)
        combine: Optional[CombineT] = None
        retriever: Optional[RetrieverT] = None
        min_score: Optional[float] = Field(None, ge=-1.0, le=1.0, allow_inf_nan=False)
        show_docs: StrictBool = False

    class QueryIn(Options):
        """One question; omitted fields take the workspace's [query] settings."""

        model_config = ConfigDict(extra="forbid")
        question: StrictStr = Field(min_length=1, max_length=MAX_QUESTION_CHARS)
        id: Optional[Union[StrictStr, StrictInt]] = Field(None, description="Echoed back in the answer.")
        max_new_tokens: Optional[StrictInt] = Field(None, ge=1, le=MAX_NEW_TOKENS)

    class BatchIn(BaseModel):
        model_config = ConfigDict(extra="forbid")
        requests: list[QueryIn] = Field(min_length=1, max_length=MAX_BATCH_ITEMS)

    class Message(BaseModel):
        model_config = ConfigDict(extra="allow")
        role: StrictStr
        content: Union[StrictStr, list, None] = None

    class ChatIn(Options):
        """OpenAI's chat completion request: the question is the last user message; regrad's
        options may come as extra fields. Fields OpenAI defines that regrad has no use for
        (temperature, user, ...) are accepted and ignored."""

        model_config = ConfigDict(extra="allow")
        model: StrictStr = "regrad"
        messages: list[Message] = Field(min_length=1, max_length=MAX_BATCH_ITEMS)
        stream: StrictBool = False
        max_tokens: Optional[StrictInt] = Field(None, ge=1, le=MAX_NEW_TOKENS)
        max_completion_tokens: Optional[StrictInt] = Field(None, ge=1, le=MAX_NEW_TOKENS)
        n: StrictInt = Field(1, ge=1, le=1)

    return QueryIn, BatchIn, ChatIn


def _json(obj, status: int = 200, headers: dict | None = None):
    from starlette.responses import Response

    return Response(json.dumps(obj, default=str), status_code=status, media_type="application/json",
                    headers=headers)


class _Guard:
    """Outermost ASGI layer: metrics for every request, the bearer token, the body size limit."""

    def __init__(self, app, settings: ServeSettings, metrics: Metrics):
        self.app, self.settings, self.metrics = app, settings, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope["path"], scope["method"]
        route = path if path in ROUTES else "other"
        t0 = time.perf_counter()
        seen = {"status": 500}

        async def send_(message):
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
            await send(message)

        try:
            if path != "/healthz" and self.settings.token and not self._authorized(scope):
                err = ApiError(401, "unauthorized", "missing or wrong bearer token (Authorization: Bearer TOKEN)")
                await _json(err.body(), 401, {"WWW-Authenticate": "Bearer"})(scope, receive, send_)
                return
            limit = self.settings.max_body_bytes
            too_big = ApiError(413, "body_too_large", f"request body over {limit} bytes", "body")
            headers = dict(scope.get("headers") or [])
            length = headers.get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > limit):
                await _json(too_big.body(), 413)(scope, receive, send_)
                return
            body = bytearray()
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body += message.get("body", b"")
                if len(body) > limit:
                    await _json(too_big.body(), 413)(scope, receive, send_)
                    return
                if not message.get("more_body"):
                    break
            replayed = False

            async def receive_():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": bytes(body), "more_body": False}
                return await receive()

            await self.app(scope, receive_, send_)
        finally:
            self.metrics.requests.labels(route, method, str(seen["status"])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - t0)
            if self.settings.access_log:
                import sys

                client = (scope.get("client") or ("-",))[0]
                sys.stderr.write(f"{client} {method} {path} {seen['status']} "
                                 f"{(time.perf_counter() - t0) * 1000:.0f} ms\n")
                sys.stderr.flush()

    def _authorized(self, scope) -> bool:
        for name, value in scope.get("headers") or []:
            if name == b"authorization":
                scheme, _, given = value.decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and hmac.compare_digest(
                    given.strip().encode(), self.settings.token.encode())
        return False


def create_app(worker: BatchWorker, settings: ServeSettings | None = None):
    """The ASGI application over ``worker`` (started by the app's lifespan if not yet started,
    closed, after draining, when the app shuts down): error mapping (``_error_handlers``), regrad's
    routes (``_query_routes``), OpenAI's (``_openai_routes``) and operations (``_ops_routes``),
    inside the guard (token, body limit, metrics, access log)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI

    from regrad_cli import __version__

    settings = settings or worker.settings

    @asynccontextmanager
    async def lifespan(app):
        if not worker._thread.is_alive() and not worker.finished.is_set():
            worker.start()  # loads in the worker thread: the port is bound meanwhile
        announce = asyncio.create_task(_announce_ready(worker, settings)) if settings.ready_line else None
        try:
            yield
        finally:
            if announce is not None:
                announce.cancel()
            # uvicorn has waited for the requests in flight; drain whatever is still queued.
            await asyncio.get_running_loop().run_in_executor(None, worker.close)

    app = FastAPI(title="regrad", version=__version__, lifespan=lifespan,
                  description="Answers questions with temporarily applied document gradients "
                              "(docs/serving.md). Every route but /healthz needs the bearer token "
                              "when the server was started with one.")
    _error_handlers(app)
    _query_routes(app, worker)
    _openai_routes(app, worker)
    _ops_routes(app, worker)
    return _Guard(app, settings, worker.metrics)


async def _announce_ready(worker: BatchWorker, settings: ServeSettings) -> None:
    """One line on stderr once the worker has loaded (when /healthz answers 200)."""
    import sys

    while not worker.finished.is_set():
        await asyncio.sleep(0.05)
    if worker.load_error is None:
        qe = worker.engine
        mode = getattr(getattr(getattr(qe, "ws", None), "config", None), "query", None)
        sys.stderr.write(f"regrad serve: ready on http://{settings.host}:{settings.port}"
                         f"{f' (default mode {mode.mode})' if mode is not None else ''}\n")
        sys.stderr.flush()


def _error_handlers(app) -> None:
    """Every error as {"error": {"type", "message", "field"?}}: ApiError as raised, request
    validation as 400 (a body that is not JSON) or 422 (naming the field), routing as 404/405,
    anything else through ``error_of`` (by exception type)."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    @app.exception_handler(ApiError)
    async def _api_error(_request, exc: ApiError):
        return _json(exc.body(), exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"type": "", "loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            where = first.get("loc", ("body", "?"))[-1]
            detail = (first.get("ctx") or {}).get("error", "")
            return _json(ApiError(400, "invalid_json", f"the body is not valid JSON ({detail} at position {where})",
                                  "body").body(), 400)
        if tuple(first.get("loc", ())) == ("body",) and "json" not in request.headers.get("content-type", ""):
            # No JSON content type: FastAPI did not parse the body at all.
            return _json(ApiError(400, "invalid_json", "the body is not a JSON object (send one with "
                                  "Content-Type: application/json)", "body").body(), 400)
        details = []
        for e in errors:
            loc = [str(p) for p in e.get("loc", ()) if p != "body"]
            name = ".".join(loc) or "body"
            msg = f"{name}: {e.get('msg', 'invalid')}"
            if name == "body":
                msg += " (send a JSON object with Content-Type: application/json)"
            details.append({"field": name, "message": msg})
        body = ApiError(422, "invalid_request", details[0]["message"], details[0]["field"]).body()
        body["error"]["details"] = details
        return _json(body, 422)

    @app.exception_handler(HTTPException)
    async def _http(_request, exc: HTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _json(ApiError(exc.status_code, kind, str(exc.detail)).body(), exc.status_code)

    @app.exception_handler(Exception)
    async def _crash(_request, exc: Exception):
        log.error("unhandled error", exc_info=exc)
        err = error_of(exc)
        return _json(err.body(), err.status)


def _to_request(worker: BatchWorker, q, question: str | None = None, max_new_tokens: int | None = None,
                on_text: Callable[[str], None] | None = None):
    """The pipeline Request for a request body's options, the workspace's [query] settings filling
    what it leaves out (``QueryConfig.request_options``, as `regrad query`); 409 at once for a
    mode that needs the bank this workspace lacks. ``on_text``: the pipeline's streaming hook."""
    from regrad_cli.online.pipeline import MODES, Request

    if not worker.ready.is_set():
        worker._check_open()
    qe = worker.engine
    opts = qe.ws.config.query.request_options(mode=q.mode, top_k=q.top_k, gamma=q.gamma, combine=q.combine,
                                              retriever=q.retriever, max_new_tokens=max_new_tokens)
    if qe.bank is None and MODES[opts["mode"]].adapter == "step":
        raise ApiError(409, "no_bank", f"mode {opts['mode']!r} needs a gradient bank and this workspace has none "
                       "for the loaded learner: run `regrad build-bank`", "mode")
    return Request(question if question is not None else q.question, show_docs=q.show_docs,
                   min_score=q.min_score, on_text=on_text, **opts)


async def _answer(worker: BatchWorker, req) -> dict:
    try:
        return await asyncio.wrap_future(worker.submit(req))
    except Exception as exc:  # noqa: BLE001
        raise error_of(exc) from None


def _query_routes(app, worker: BatchWorker) -> None:
    """regrad's own routes: /v1/query and /v1/query:batch (the JSON of `regrad query --json`)."""
    QueryIn, BatchIn, _ = _models()

    def with_id(q, res: dict) -> dict:
        return res if q.id is None else {"id": q.id, **res}

    @app.post("/v1/query", summary="Answer one question (the JSON of `regrad query --json`)")
    async def query(q: QueryIn):  # type: ignore[valid-type]
        return _json(with_id(q, await _answer(worker, _to_request(worker, q, max_new_tokens=q.max_new_tokens))))

    @app.post("/v1/query:batch", summary="Answer a list of questions; each result or error in order")
    async def query_batch(b: BatchIn):  # type: ignore[valid-type]
        futs = []
        for q in b.requests:
            try:
                futs.append(worker.submit(_to_request(worker, q, max_new_tokens=q.max_new_tokens)))
            except ApiError as exc:
                if exc.type in ("shutting_down", "not_ready", "overloaded"):
                    for f in futs:
                        f.cancel()
                    raise
                futs.append(exc)
        out = []
        for q, fut in zip(b.requests, futs):
            try:
                if isinstance(fut, ApiError):
                    raise fut
                out.append(with_id(q, await asyncio.wrap_future(fut)))
            except Exception as exc:  # noqa: BLE001
                err = error_of(exc)
                out.append({**({"id": q.id} if q.id is not None else {}), "question": q.question,
                            **err.body(), "status": err.status})
        return _json({"results": out})


OPENAI_MODEL = "regrad"


def _chat_question(messages) -> str:
    """The question of a chat request: the text of its last user message."""
    for m in reversed(messages):
        if m.role != "user":
            continue
        content = m.content
        if isinstance(content, list):  # content parts: the text ones, joined
            content = "\n".join(str(p.get("text", "")) for p in content
                                if isinstance(p, dict) and p.get("type") == "text")
        if isinstance(content, str) and content.strip():
            if len(content) > MAX_QUESTION_CHARS:
                raise ApiError(422, "invalid_request", f"messages: the question is over {MAX_QUESTION_CHARS} "
                               "characters", "messages")
            return content
    raise ApiError(422, "invalid_request", "messages: no user message with text (the question is the last "
                   "user message)", "messages")


def _openai_routes(app, worker: BatchWorker) -> None:
    """OpenAI-compatible routes: POST /v1/chat/completions (plain or server-sent events) and GET
    /v1/models, so that OpenAI's clients and the frameworks built on them can talk to regrad. The
    question is the last user message; regrad's options (mode, top_k, gamma, ...) are extra body
    fields; the answer's retrieved documents, mode, warnings and timings are in "regrad"."""
    import uuid

    from starlette.responses import StreamingResponse

    _, _, ChatIn = _models()

    @app.get("/v1/models", summary="The model regrad serves (OpenAI's list format)")
    async def models():
        return _json({"object": "list", "data": [{"id": OPENAI_MODEL, "object": "model", "created": 0,
                                                   "owned_by": "regrad"}]})

    @app.post("/v1/chat/completions", summary="Answer the last user message (OpenAI's chat completion format)")
    async def chat(c: ChatIn):  # type: ignore[valid-type]
        question, max_new = _chat_question(c.messages), c.max_completion_tokens or c.max_tokens
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if not c.stream:
            res = await _answer(worker, _to_request(worker, c, question=question, max_new_tokens=max_new))
            return _json({"id": cid, "object": "chat.completion", "created": created, "model": c.model,
                          "choices": [{"index": 0, "message": {"role": "assistant", "content": res["answer"]},
                                       "logprobs": None, "finish_reason": "stop"}],
                          "usage": None, "regrad": _chat_extra(res)})
        events = _Stream(asyncio.get_running_loop())
        fut = worker.submit(_to_request(worker, c, question=question, max_new_tokens=max_new, on_text=events.text))
        fut.add_done_callback(events.done)
        # Wait for the first text (or the end) before answering: a request that fails before its
        # answer starts (no bank, a bad field) still gets its HTTP status, as without "stream".
        first = await events.next()
        if first[0] == "done" and first[1].exception() is not None:
            raise error_of(first[1].exception())

        def chunk(delta: dict, finish: str | None = None, **more) -> str:
            body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": c.model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **more}
            return f"data: {json.dumps(body, default=str)}\n\n"

        async def sse():
            # OpenAI's stream: the role, the answer's text as it is generated (each token's text
            # once no later token can change it), the end with regrad's extra field, [DONE].
            yield chunk({"role": "assistant", "content": ""})
            kind, value = first
            while kind == "text":
                yield chunk({"content": value})
                kind, value = await events.next()
            exc = value.exception()
            if exc is not None:  # failed after its text began: an error event, as OpenAI sends
                yield f"data: {json.dumps(error_of(exc).body(), default=str)}\n\n"
                return
            yield chunk({}, "stop", regrad=_chat_extra(value.result()))
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _chat_extra(res: dict) -> dict:
    """The "regrad" field of a chat completion: the answer's documents, mode, warnings, timings."""
    return {k: res[k] for k in ("mode", "retrieved", "warnings", "skipped", "timings_ms") if k in res}


class _Stream:
    """One streamed answer, from the worker thread to the response: ``text`` receives the answer
    so far (the pipeline's ``on_text``), ``done`` the request's future; ``next`` gives
    ("text", new text) items, then ("done", future). Both go through the event loop's own queue,
    in the order the worker made them."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue, self.sent = loop, asyncio.Queue(), ""

    def _put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop has closed: nobody is listening any more
            pass

    def text(self, so_far: str) -> None:
        # A batch retried one request at a time (serve's BatchWorker) sends the same texts again.
        if len(so_far) > len(self.sent) and so_far.startswith(self.sent):
            new, self.sent = so_far[len(self.sent):], so_far
            self._put(("text", new))

    def done(self, fut: concurrent.futures.Future) -> None:
        self._put(("done", fut))

    async def next(self) -> tuple:
        return await self.queue.get()


def _ops_routes(app, worker: BatchWorker) -> None:
    """Operations: /v1/bank/stats, /healthz (deep=1 re-hashes the weights) and /metrics."""

    @app.get("/v1/bank/stats", summary="The gradient bank's stats (`regrad bank stats --json`)")
    async def bank_stats():
        def stats(qe):
            if qe.bank is None:
                raise ApiError(404, "no_bank", "this workspace has no gradient bank for the loaded learner")
            s = qe.bank.stats()
            s["lora"] = qe.bank.meta.learner.get("lora")
            return s

        try:
            return _json(await asyncio.wrap_future(worker.call(stats)))
        except Exception as exc:  # noqa: BLE001
            raise error_of(exc) from None

    @app.get("/healthz", summary="Readiness (200 once loaded); deep=1 re-hashes the weights")
    async def healthz(deep: bool = False):
        body: dict[str, Any] = {"status": worker.status, "batches": worker.batches}
        if worker.load_error is not None:
            body["error"] = str(worker.load_error)
        if worker.status != "ready":
            return _json(body, 503)
        if deep:
            now = await asyncio.wrap_future(worker.call(lambda qe: weight_hashes(qe.engine)))
            body["weights"] = {k: {"at_start": worker.hashes[k], "now": now[k], "unchanged": now[k] == worker.hashes[k]}
                               for k in worker.hashes}
            body["unchanged"] = all(v["unchanged"] for v in body["weights"].values())
            if not body["unchanged"]:
                body["status"] = "weights_changed"
                return _json(body, 500)
        return _json(body)

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus():
        from starlette.responses import Response

        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(worker.metrics.text(), media_type=CONTENT_TYPE_LATEST)


# Running ------------------------------------------------------------------------------------------------
def _uvicorn_config(app, settings: ServeSettings, **kw):
    import uvicorn

    from regrad_cli.online.shedding import ClientLimits, install_log_limits, protocol_class

    limits = ClientLimits(header_timeout_s=settings.header_timeout_s, body_timeout_s=settings.body_timeout_s,
                          keep_alive_s=settings.keep_alive_s, max_connections=settings.max_connections)
    backlog = limits.backlog()
    config = uvicorn.Config(app, host=settings.host, port=settings.port, lifespan="on",
                            log_level=kw.pop("log_level", "warning"), access_log=False,
                            timeout_graceful_shutdown=kw.pop("timeout_graceful_shutdown", None),
                            http=protocol_class(limits, backlog), timeout_keep_alive=settings.keep_alive_s,
                            backlog=backlog, **kw)
    install_log_limits()
    return config


def serve(ws, settings: ServeSettings, *, checkpoint: str | None = None, device: str | None = None,
          strict: bool = False, log_level: str = "info") -> None:
    """Run the server in the foreground until SIGINT/SIGTERM; RegradError if loading fails."""
    import uvicorn

    from regrad_cli.online.query import QueryEngine

    holder: dict = {}

    def failed(_exc):
        server = holder.get("server")
        if server is not None:
            server.should_exit = True

    worker = BatchWorker(lambda: QueryEngine(ws, checkpoint=checkpoint, device=device, strict=strict),
                         settings, on_load_error=failed)
    server = uvicorn.Server(_uvicorn_config(create_app(worker, settings), settings, log_level=log_level))
    holder["server"] = server
    server.run()
    if worker.load_error is not None:
        exc = worker.load_error
        raise exc if isinstance(exc, RegradError) else RegradError(f"loading failed: {exc}")
    if not server.started:
        raise RegradError(f"could not listen on {settings.host}:{settings.port} (is the port in use?)")


class BackgroundServer:
    """uvicorn serving ``worker`` in a thread on a loopback port (tests, benchmarks).

    ``start()`` returns once the port accepts connections and the worker is loaded;
    ``stop()`` is the graceful shutdown (requests in flight are answered first)."""

    def __init__(self, worker: BatchWorker, settings: ServeSettings | None = None, port: int = 0):
        import socket

        import uvicorn

        self.worker = worker
        self.settings = settings or worker.settings
        if port == 0:
            with socket.socket() as s:
                s.bind((self.settings.host, 0))
                port = s.getsockname()[1]
        self.settings.port = port
        self.url = f"http://{self.settings.host}:{port}"
        self.server = uvicorn.Server(_uvicorn_config(create_app(worker, self.settings), self.settings))
        self.thread = threading.Thread(target=self.server.run, name="regrad-serve-uvicorn", daemon=True)

    def start(self, timeout: float = 120.0) -> "BackgroundServer":
        self.thread.start()
        t0 = time.monotonic()
        while not (self.server.started and self.worker.finished.is_set()):
            if not self.thread.is_alive() or time.monotonic() - t0 > timeout:
                raise RegradError(f"the server at {self.url} did not start")
            time.sleep(0.02)
        if self.worker.load_error is not None:
            self.stop()
            raise RegradError(f"loading failed: {self.worker.load_error}")
        return self

    def stop(self, timeout: float = 120.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
