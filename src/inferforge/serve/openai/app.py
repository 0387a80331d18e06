"""The OpenAI-compatible FastAPI app: HTTP and JSON here, everything about tokens through `EngineClient`."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from dataclasses import replace
from typing import Any, TypeVar

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from inferforge.errors import InferforgeError
from inferforge.heap import refreeze
from inferforge.llm.protocol import EngineClient, EngineOutput, EngineStats
from inferforge.serve.openai.convert import Plan, detokenize, plan_chat, plan_completion, tokenize
from inferforge.serve.openai.engine_io import Tracker, run_requests
from inferforge.serve.openai.errors import APIError, error_body
from inferforge.serve.openai.guard import KEY_STATE, Guard
from inferforge.serve.openai.limits import ServerLimits
from inferforge.serve.openai.metrics import ITLClock, ServerMetrics
from inferforge.serve.openai.render import Accumulator, TokenText, envelope
from inferforge.serve.openai.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    StreamOptions,
    TokenizeRequest,
)
from inferforge.serve.openai.stream import StreamCtx, chat_stream, completion_stream

T = TypeVar("T")
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


class ClientGone(Exception):
    """The client disconnected before the answer was ready."""


def engine_error(exc: BaseException) -> APIError | None:
    """Map an engine refusal to a status: full queue 429 (retry later), shutting down 503, bad value 400."""
    if isinstance(exc, APIError):
        return exc
    names = {cls.__name__ for cls in type(exc).__mro__}
    if "QueueFullError" in names:
        return APIError(429, f"The server is at capacity: {exc}. Retry later.", code="queue_full")
    if "EngineClosedError" in names:
        return APIError(503, f"The server is shutting down: {exc}.", code="draining")
    if "EngineProcessError" in names:  # the engine died or stopped before this request's first token
        return APIError(503, f"The engine is not available: {exc}. Retry elsewhere.", code="engine_down")
    if isinstance(exc, InferforgeError | ValueError):
        return APIError(400, str(exc), code="invalid_value")
    return None


class DisconnectWatch:
    """Cancel the current task when the client disconnects: one plain task reading `receive`.

    Why not `asyncio.wait` on two tasks, or Starlette's `StreamingResponse`: on uvicorn (ASGI 2.3) the latter
    runs every stream in an anyio task group with a second task, and cancelling its scope formats the task's
    repr: about a third of an HTTP worker's busy time per streamed request on the CPU box (py-spy), and a
    wave of requests reaches the engine only as fast as the workers get through them. `stop()` it before the
    task moves on."""

    def __init__(self, receive: Any) -> None:
        self.left = False
        self._task = asyncio.current_task()
        self._active = True
        self._watcher = asyncio.get_running_loop().create_task(self._listen(receive))

    async def _listen(self, receive: Any) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if self._active and self._task is not None:
            self.left = True
            self._task.cancel()

    def stop(self) -> None:
        self._active = False
        self._watcher.cancel()
        if self.left and self._task is not None:
            self._task.uncancel()  # the cancellation was ours and has been handled


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work` unless the client leaves first; then cancel it (its cleanup aborts the engine request)."""
    watch = DisconnectWatch(request.receive)
    try:
        return await work
    except asyncio.CancelledError:
        if watch.left:
            raise ClientGone() from None
        raise
    finally:
        watch.stop()


class SSEResponse(Response):
    """A server-sent event stream that ends, closing its body (which aborts the engine request), when the
    client disconnects (`DisconnectWatch`)."""

    media_type = "text/event-stream"

    def __init__(self, body: AsyncGenerator[bytes, None], headers: dict[str, str]) -> None:
        self.body_iterator = body
        self.status_code = 200
        self.background = None
        self.init_headers(headers)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        watch = DisconnectWatch(receive)
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for chunk in self.body_iterator:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not watch.left:
                raise
        finally:
            watch.stop()
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


def timing_headers(tracker: Tracker) -> dict[str, str]:
    spans: dict[str, list[float]] = {"queue": [], "prefill": [], "ttft": [], "decode": [], "e2e": []}
    for t in tracker.timings.values():
        if t.scheduled is not None:
            spans["queue"].append(t.scheduled - t.arrival)
        if t.first_token is not None:
            spans["ttft"].append(t.first_token - t.arrival)
            if t.scheduled is not None:
                spans["prefill"].append(t.first_token - t.scheduled)
        if t.finished is not None:
            spans["e2e"].append(t.finished - t.arrival)
            if t.first_token is not None:
                spans["decode"].append(t.finished - t.first_token)
    return {f"x-inferforge-{k}-ms": f"{max(v) * 1e3:.3f}" for k, v in spans.items() if v}


class OpenAIServer:
    """State shared by the routes of one app: the engine, its served name, limits and metrics."""

    def __init__(
        self,
        engine: EngineClient,
        model_name: str,
        limits: ServerLimits,
        multiprocess_dir: str | None = None,
        stream_interval: int = 1,
        prefix_cache_per_key: bool = True,
    ) -> None:
        if stream_interval < 1:
            raise ValueError(f"stream_interval must be >= 1 token, got {stream_interval}")
        self.stream_interval = stream_interval
        self.prefix_cache_per_key = prefix_cache_per_key
        self.engine = engine
        self.model_name = model_name
        self.limits = limits
        self.metrics = ServerMetrics(engine, multiprocess_dir)
        self.text_of = TokenText(engine)
        self.draining = False
        self.created = int(time.time())
        self.inflight: set[str] = set()  # engine request ids of unfinished HTTP requests

    def scoped(self, plan: Plan, request: Request) -> Plan:
        """With API keys and `prefix_cache_per_key`, each request's cache salt names its key (and then its own
        `cache_salt`): requests of one key share cached prompt blocks, requests of two keys never do, so no
        key can tell from time to first token what prompt starts another key sent."""
        key = getattr(request.state, KEY_STATE, None)
        if not self.prefix_cache_per_key or key is None:
            return plan
        salted = tuple(
            replace(r, cache_salt=f"key:{key}" + (f"|{r.cache_salt}" if r.cache_salt else ""))
            for r in plan.requests
        )
        return replace(plan, requests=salted)

    async def abort_inflight(self) -> None:
        """End of the drain period: abort what is still running so its responses end cleanly."""
        for rid in list(self.inflight):
            with contextlib.suppress(Exception):
                await self.engine.abort(rid)

    def finish(self, tracker: Tracker, plan: Plan) -> None:
        self.inflight.difference_update(r.request_id for r in plan.requests)
        m = self.metrics
        for idx in range(len(plan.requests)):
            tokens = sum(v for (p, _), v in tracker.completion_tokens.items() if p == idx)
            if tracker.prompt_done(idx) and idx not in tracker.aborted:
                m.observe_timing(tracker.timings[idx], tokens)
            else:  # the client left, the drain ended, or the engine refused it
                m.aborted.inc()
            m.generation_tokens.inc(tokens)
        m.prompt_tokens.inc(sum(tracker.prompt_tokens.values()))

    async def _collect(self, plan: Plan, tracker: Tracker) -> Accumulator:
        acc = Accumulator(len(plan.requests), plan.n)
        itl = ITLClock(self.metrics.itl)
        gen = run_requests(self.engine, plan.requests, tracker)
        try:
            async for idx, out in gen:
                itl.tick((idx, out.index), len(out.new_token_ids))
                acc.add(idx, out)
        finally:
            with anyio.CancelScope(shield=True):
                await gen.aclose()
        return acc

    async def _prime(
        self, request: Request, plan: Plan, tracker: Tracker
    ) -> tuple[tuple[int, EngineOutput] | None, AsyncGenerator[tuple[int, EngineOutput], None]]:
        gen = run_requests(self.engine, plan.requests, tracker)
        try:
            first = await until_disconnect(request, gen.__anext__())
        except StopAsyncIteration:
            first = None
        except BaseException:
            with anyio.CancelScope(shield=True):
                await gen.aclose()
            raise
        return first, gen

    async def handle(
        self, request: Request, plan: Plan, options: StreamOptions | None, stream: bool, chat: bool
    ) -> Response:
        """`options.include_usage` adds a last chunk with the usage; with `continuous_usage_stats` too
        (vLLM's extension), every chunk carries the usage so far."""
        include_usage = bool(options and options.include_usage)
        tracker = Tracker(plan.n, plan.prompt_only)
        route = request.url.path
        self.inflight.update(r.request_id for r in plan.requests)
        try:
            if stream:
                first, rest = await self._prime(request, plan, tracker)
                ctx = StreamCtx(
                    plan,
                    self.model_name,
                    int(time.time()),
                    tracker,
                    self.metrics,
                    self.text_of,
                    include_usage,
                    first,
                    rest,
                    lambda: self.finish(tracker, plan),
                    self.stream_interval,
                    include_usage and bool(options and options.continuous_usage_stats),
                )
                body = chat_stream(ctx) if chat else completion_stream(ctx)
                self.metrics.requests.labels(route, "200").inc()
                headers = {**SSE_HEADERS, **timing_headers(tracker)}
                return SSEResponse(body, headers)
            acc = await until_disconnect(request, self._collect(plan, tracker))
        except ClientGone:
            self.finish(tracker, plan)
            self.metrics.requests.labels(route, "499").inc()
            return Response(status_code=499)
        except Exception as exc:
            err = engine_error(exc)
            if err is None:
                raise
            self.finish(tracker, plan)
            raise err from exc
        self.finish(tracker, plan)
        if chat:
            choices, obj = acc.chat(self.text_of, plan.logprobs is not None, plan.tools), "chat.completion"
        else:
            choices, obj = (
                acc.completion(
                    self.text_of,
                    plan.prompt_texts,
                    plan.logprobs is not None,
                    plan.first_ids,
                    plan.prompt_only,
                ),
                "text_completion",
            )
        payload = envelope(plan.response_id, obj, int(time.time()), self.model_name, choices, tracker.usage())
        self.metrics.requests.labels(route, "200").inc()
        return JSONResponse(payload, headers=timing_headers(tracker))


_UNION_HINTS = {
    "prompt": "give a string, a list of strings, a list of token ids (integers >= 0) or a list of such lists",
    "stop": "give a string or a list of strings",
    "messages": "each message needs a role and content: a string or a list of {'type': 'text', 'text': ...}",
}


def _is_type_tag(part: str) -> bool:
    """pydantic names the union branch it tried ('str', 'list[int]', ...) in the error location."""
    return (
        "[" in part
        or part in ("str", "int", "float", "bool", "constrained-int")
        or part.startswith("function-")
    )


def _install_errors(app: FastAPI, state: OpenAIServer) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        state.metrics.requests.labels(request.url.path, str(exc.status)).inc()
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = loc[0] if loc else None
        where = ".".join(loc) or "body"
        msg = f"Invalid value for '{where}': {first.get('msg', 'invalid')}."
        if param in _UNION_HINTS and any(_is_type_tag(p) for p in loc[1:]):
            msg = f"Invalid value for '{param}': {_UNION_HINTS[param]}."
        if first.get("type") == "json_invalid":
            msg, param = "The request body is not valid JSON.", None
        state.metrics.requests.labels(request.url.path, "400").inc()
        return JSONResponse(error_body(400, msg, param=param, code="invalid_value"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(error_body(500, f"internal error: {type(exc).__name__}"), status_code=500)


def create_app(
    engine: EngineClient,
    *,
    model_name: str | None = None,
    limits: ServerLimits | None = None,
    api_keys: set[str] | None = None,
    shutdown_grace_s: float = 0.0,
    multiprocess_dir: str | None = None,
    stream_interval: int = 1,
    prefix_cache_per_key: bool = True,
) -> FastAPI:
    """Build the app; the lifespan's end shuts the engine down (after uvicorn has drained the connections).

    `multiprocess_dir`: set in each HTTP worker of `--api-server-count N`, so /metrics covers all workers."""
    state = OpenAIServer(
        engine, model_name or engine.model_name, limits or ServerLimits(), multiprocess_dir, stream_interval,
        prefix_cache_per_key,
    )  # fmt: skip

    async def current_stats() -> EngineStats:
        """The engine's figures now: a link to an engine in another process asks it (between two steps)."""
        refresh = getattr(engine, "refresh_stats", None)
        return await refresh() if refresh is not None else engine.stats()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(refreeze)  # the loaded process out of the collector's full scans
        yield
        state.draining = True
        await engine.shutdown(shutdown_grace_s)

    app = FastAPI(
        title="inferforge OpenAI-compatible server", lifespan=lifespan, docs_url=None, redoc_url=None
    )
    app.state.openai = state
    _install_errors(app, state)

    @app.get("/health")
    async def health() -> Response:
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        alive = getattr(engine, "is_alive", None)  # optional: engines in another process can die alone
        if alive is not None and not alive():
            return JSONResponse({"status": "engine down"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        body = state.metrics.render(await current_stats())
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/stats")
    async def stats() -> dict[str, Any]:
        s = await current_stats()
        return {
            "running": s.running,
            "waiting": s.waiting,
            "kv_blocks_total": s.kv_blocks_total,
            "kv_blocks_used": s.kv_blocks_used,
            "generated_tokens_total": s.generated_tokens_total,
        }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {
            "id": state.model_name,
            "object": "model",
            "created": state.created,
            "owned_by": "inferforge",
            "max_model_len": engine.max_model_len,
        }
        return {"object": "list", "data": [card]}

    @app.post("/tokenize")
    async def tokenize_route(req: TokenizeRequest) -> dict[str, Any]:
        """vLLM's: how many tokens a prompt (or chat) takes, before sending it."""
        ids = tokenize(req, engine, state.model_name)
        return {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize_route(req: DetokenizeRequest) -> dict[str, Any]:
        return {"prompt": detokenize(req, engine, state.model_name)}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Response:
        plan = state.scoped(plan_completion(req, engine, state.limits, state.model_name), request)
        return await state.handle(request, plan, req.stream_options, req.stream, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request) -> Response:
        plan = state.scoped(plan_chat(req, engine, state.limits, state.model_name), request)
        return await state.handle(request, plan, req.stream_options, req.stream, chat=True)

    app.add_middleware(
        Guard,
        api_keys=api_keys,
        max_body_bytes=state.limits.max_body_bytes,
        is_draining=lambda: state.draining,
    )
    return app
