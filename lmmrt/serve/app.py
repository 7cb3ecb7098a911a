"""The HTTP side of `lmmrt serve`: an OpenAI-compatible API (FastAPI) in front of the continuous-batching
engine (lmmrt.serve.engine).

POST /v1/chat/completions and /v1/completions (streamed as Server-Sent Events or not), GET /v1/models,
/health and /metrics (Prometheus). Errors are OpenAI's {"error": {...}} with the right status: 400 for a
bad request (checked here, or by Engine.submit), 401 for a wrong API key, 404 for an unknown model, 503
with Retry-After when the engine's queue is full. A client that disconnects cancels its request, which
frees its slot at the next scheduler step.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmmrt.serve import metrics as prometheus
from lmmrt.serve.chat_template import ChatFormatter, openai_messages_to_template
from lmmrt.serve.images import (
    MAX_IMAGE_PIXELS,
    MAX_REQUEST_PIXELS,
    decode_images,
    open_images,
    set_pil_pixel_limit,
)
from lmmrt.serve.openai_responses import SSE_DONE, ResponseShape, sse
from lmmrt.serve.openai_schema import APIError, ChatCompletionRequest, CompletionRequest, parse_request
from lmmrt.serve.prompt_length import prompt_length
from lmmrt.serve.requests import Delta, EngineClosed, EngineRequest, Finished, QueueFull

MAX_BODY_BYTES = 128 << 20  # a request body (images included, base64) at most
# requests whose images are decoded at once: with the per-request pixel budget, a bound on decoded pixels
# in memory (the others wait; their limits are checked before they wait). A request holds its slot until
# the engine has its images as pixel tensors (submitted): decoded images waiting for the submit thread are
# counted too (8 concurrent requests of four 4096^2 images each took 4.3 GB when the slot ended at decoding)
IMAGE_DECODE_SLOTS = 2


@dataclass
class ServeOptions:
    model_name: str
    api_key: str | None = None
    local_media_root: str | None = None  # file:// URLs are read inside it (resolved; "/": any file); None: refused
    max_images: int = 16  # per request
    max_image_pixels: int = MAX_IMAGE_PIXELS  # per image, read from its header before decoding
    max_request_pixels: int = MAX_REQUEST_PIXELS  # all of a request's images together
    shutdown_grace_s: float = 10.0  # what the engine gets to finish or cancel its requests at shutdown


class _StatusCounter:
    """ASGI middleware counting responses by status for /metrics (a plain ASGI wrapper: Starlette's
    BaseHTTPMiddleware would sit between a stream and its client's disconnect)."""

    def __init__(self, app, metrics: prometheus.ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.response(message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)


async def _cancel_on_disconnect(request: Request, handle) -> None:
    """Cancel `handle` as soon as the client goes away (the request body is already read: the next
    message the server has for this request is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    request.state.client_left = True  # the request's end is the client's doing, not the server's
    handle.cancel()


class Server:
    """The routes' shared state: the engine, the model's chat formatter, options and metrics."""

    def __init__(self, engine, model, options: ServeOptions, formatter: ChatFormatter | None):
        self.engine, self.model, self.options, self.formatter = engine, model, options, formatter
        self.metrics = prometheus.ServerMetrics()
        self.started = int(time.time())
        # Engine.submit tokenizes and checks the request synchronously: off the event loop, one at a time.
        self.submit_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmmrt-submit")
        self.decode_slots = asyncio.Semaphore(IMAGE_DECODE_SLOTS)
        set_pil_pixel_limit(options.max_image_pixels)

    # -- checks -----------------------------------------------------------------------------------------
    def check_key(self, request: Request) -> None:
        if self.options.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, key = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.options.api_key.encode()):
            raise APIError(401, "invalid or missing API key (send it as 'Authorization: Bearer KEY')",
                           code="invalid_api_key")

    def check_model(self, name: str) -> None:
        if name != self.options.model_name:
            raise APIError(404, f"the model {name!r} does not exist: this server serves "
                                f"{self.options.model_name!r} (GET /v1/models)", param="model", code="model_not_found")

    async def read_body(self, request: Request, kind):
        self.check_key(request)
        data = bytearray()
        async for chunk in request.stream():  # read with a cap: one client cannot make the server hold gigabytes
            data += chunk
            if len(data) > MAX_BODY_BYTES:
                raise APIError(413, f"the request body is larger than {MAX_BODY_BYTES >> 20} MiB")
        try:
            body = json.loads(data)
        except ValueError as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
        except RecursionError:  # the parser recurses per nesting level
            raise APIError(400, "the request body is nested too deeply to parse (arrays / objects inside each "
                                "other hundreds of levels deep)") from None
        req = parse_request(kind, body)
        self.check_model(req.model)
        return req

    # -- generation -------------------------------------------------------------------------------------
    def engine_request(self, req, prompt, images, extra_stop=()) -> EngineRequest:
        max_tokens = req.max_tokens
        if max_tokens is None:  # as vLLM: the rest of the context (the engine says when nothing is left)
            max_tokens = max(1, self.engine.max_context - prompt_length(self.model, prompt))
        stop = req.stop_list + [s for s in extra_stop if s not in req.stop_list]
        return EngineRequest(prompt=prompt, images=images, max_tokens=max_tokens, temperature=req.temperature,
                             top_p=req.top_p, top_k=max(req.top_k, 0), stop=stop, seed=req.seed,
                             ignore_eos=req.ignore_eos)

    async def submit(self, urls, make_request):
        """Decode the images of `urls` and submit make_request(images) to the engine; its handle. A full
        queue is found before any image is decoded, and the images are dropped once the engine has them
        as tensors (a decode slot is held until then)."""
        self.engine_room()  # a request the engine would refuse decodes nothing
        if not urls:
            return await self.engine_submit(make_request([]))
        o = self.options
        opened = await asyncio.to_thread(open_images, urls, local_root=o.local_media_root, max_images=o.max_images,
                                         max_image_pixels=o.max_image_pixels, max_request_pixels=o.max_request_pixels)
        async with self.decode_slots:
            self.engine_room()  # the queue may have filled while this request waited
            images = await asyncio.to_thread(decode_images, opened)
            del opened
            return await self.engine_submit(make_request(images))

    def engine_room(self) -> None:
        with _engine_errors():
            self.engine.check_room()

    async def engine_submit(self, ereq: EngineRequest):
        loop = asyncio.get_running_loop()
        with _engine_errors():
            return await loop.run_in_executor(self.submit_pool, self.engine.submit, ereq)

    async def events(self, request: Request, handle, t0: float):
        """The handle's events, timed into the metrics; the request is cancelled when the client leaves or
        the consumer stops early."""
        watcher = asyncio.create_task(_cancel_on_disconnect(request, handle))
        finished, first = False, True
        try:
            async for ev in handle.events():
                now = time.monotonic()
                if isinstance(ev, Delta):
                    if first:
                        self.metrics.first_token(now - t0)
                        first = False
                    self.metrics.tokens(len(ev.token_ids))
                elif isinstance(ev, Finished):
                    finished = True
                    self.metrics.request_done(now - t0, ev.finish_reason, ev.prompt_tokens)
                yield ev
        finally:
            watcher.cancel()
            if not finished:  # the client left (or the server stopped the stream): nobody reads the rest
                handle.cancel()
                self.metrics.request_done(time.monotonic() - t0, "cancelled", handle.prompt_tokens)

    async def answer(self, request: Request, handle, shape: ResponseShape, stream: bool, t0: float):
        if stream:
            return StreamingResponse(self.stream(request, handle, shape, t0), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        text = ""
        async with contextlib.aclosing(self.events(request, handle, t0)) as events:
            async for ev in events:
                if isinstance(ev, Delta):
                    text += ev.text
                else:
                    _raise_unfinished(ev, client_left=getattr(request.state, "client_left", False))
                    return JSONResponse(shape.full(text, ev.finish_reason, ev.prompt_tokens, ev.completion_tokens))
        raise APIError(500, "the engine ended the request without finishing it", type="server_error")

    async def stream(self, request: Request, handle, shape: ResponseShape, t0: float):
        yield sse(shape.chunk("" if shape.chat else None, first=True))
        async with contextlib.aclosing(self.events(request, handle, t0)) as events:
            async for ev in events:
                if isinstance(ev, Delta):
                    if ev.text:
                        yield sse(shape.chunk(ev.text))
                    continue
                try:
                    _raise_unfinished(ev)
                except APIError as e:  # the status is sent already: the error goes in the stream
                    yield sse(e.body())
                else:
                    yield sse(shape.chunk(None, ev.finish_reason))
                    if shape.include_usage:
                        yield sse(shape.usage_chunk(ev.prompt_tokens, ev.completion_tokens))
                break
        yield SSE_DONE

    # -- endpoints --------------------------------------------------------------------------------------
    async def chat(self, request: Request):
        t0 = time.monotonic()
        req = await self.read_body(request, ChatCompletionRequest)
        if self.formatter is None:
            raise APIError(400, "this model has no tokenizer, so no chat: use /v1/completions with token ids")
        messages, urls = openai_messages_to_template(req.messages)
        prompt = self.formatter.render(messages)
        n = prompt.text.count(self.formatter.marker)
        if n != len(urls):
            raise APIError(400, f"{self.formatter.source} wrote {n} image marker(s) for the {len(urls)} image(s) "
                                "of the messages", param="messages")
        handle = await self.submit(urls, lambda images: self.engine_request(req, prompt.text, images, prompt.stop))
        shape = ResponseShape(chat=True, request_id=handle.id, created=int(time.time()),
                              model=self.options.model_name, include_usage=req.include_usage)
        return await self.answer(request, handle, shape, req.stream, t0)

    async def completion(self, request: Request):
        t0 = time.monotonic()
        req = await self.read_body(request, CompletionRequest)
        urls = [(url, f"images[{i}]") for i, url in enumerate(req.images)]
        handle = await self.submit(urls, lambda images: self.engine_request(req, req.prompt, images))
        shape = ResponseShape(chat=False, request_id=handle.id, created=int(time.time()),
                              model=self.options.model_name, include_usage=req.include_usage)
        return await self.answer(request, handle, shape, req.stream, t0)

    async def models(self, request: Request) -> dict:
        self.check_key(request)
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self) -> dict:
        return {"id": self.options.model_name, "object": "model", "created": self.started, "owned_by": "lmmrt",
                "max_model_len": self.engine.max_context}


@contextlib.contextmanager
def _engine_errors():
    """The engine's refusals as API errors: 503 (queue full, with Retry-After; shutting down), 400."""
    try:
        yield
    except QueueFull as e:
        retry = max(1, math.ceil(e.retry_after))
        raise APIError(503, f"the server is overloaded ({e}); retry after {retry} s", type="server_error",
                       code="queue_full", headers={"Retry-After": str(retry)}) from None
    except EngineClosed as e:
        raise APIError(503, f"the server is shutting down ({e})", type="server_error", code="shutting_down") \
            from None
    except (ValueError, TypeError) as e:
        raise APIError(400, api_wording(str(e))) from None


def api_wording(message: str) -> str:
    """The engine's (lmmrt.generate's) message with its argument names said as the API's fields."""
    return message.replace("max_new_tokens=", "max_tokens=").replace("prompt 0 ", "the prompt ")


# nginx's status for a request whose client closed the connection first: nobody reads the answer, but the
# metrics and the access log tell it from the server's own refusals (503)
CLIENT_CLOSED_REQUEST = 499


def _raise_unfinished(ev: Finished, *, client_left: bool = False) -> None:
    """A request that ended without an answer (its client left, cancelled at shutdown, failed in the engine)
    as an APIError."""
    if ev.finish_reason == "cancelled" and client_left:
        raise APIError(CLIENT_CLOSED_REQUEST, "the client closed the connection before the answer was complete",
                       code="client_closed_request")
    if ev.finish_reason == "cancelled":
        raise APIError(503, "the request was cancelled (the server is shutting down)", type="server_error",
                       code="cancelled")
    if ev.finish_reason == "error":
        raise APIError(500, f"the engine failed on this request: {ev.error}", type="server_error")


def build_app(engine, model, options: ServeOptions, formatter: ChatFormatter | None, *,
              on_ready=None) -> FastAPI:
    """The FastAPI app. Its lifespan starts the engine (then calls on_ready()) and, at shutdown (after the
    server has stopped accepting and drained or cancelled its streams), shuts it down."""
    server = Server(engine, model, options, formatter)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        if on_ready is not None:
            on_ready()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.shutdown, options.shutdown_grace_s)
            server.submit_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="lmmrt serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server
    app.add_middleware(_StatusCounter, metrics=server.metrics)

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e: RequestValidationError):
        return JSONResponse(APIError(400, str(e)).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        err = APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                       code="not_found" if e.status_code == 404 else None)
        return JSONResponse(err.body(), status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request, e: Exception):
        err = APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error")
        return JSONResponse(err.body(), status_code=500)

    app.add_api_route("/v1/chat/completions", server.chat, methods=["POST"])
    app.add_api_route("/v1/completions", server.completion, methods=["POST"])
    app.add_api_route("/v1/models", server.models, methods=["GET"])

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request):
        server.check_key(request)
        server.check_model(name)
        return server.model_card()

    @app.get("/health")
    async def health():
        if not engine.alive:  # the scheduler thread is gone: nothing would be answered
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():  # on the event loop, which owns ServerMetrics
        text = prometheus.render(server.metrics, engine.metrics(), model_name=options.model_name)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    return app
