"""The HTTP layer: `create_app(config)` builds the FastAPI app around an Engine.

Endpoints: POST /v1/chat/completions (OpenAI schema, SSE streaming), GET /v1/models, GET /health (200 once the
model is loaded and warmed), GET /metrics (Prometheus text). Every refusal is an OpenAI-style JSON error.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations, and they name classes imported
# inside create_app (fastapi is imported lazily).
import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from vzedge.serve.config import ServeConfig
from vzedge.serve.engine import Engine, Job
from vzedge.serve.errors import RequestError, error_body

log = logging.getLogger(__name__)


def _fastapi():
    try:
        import fastapi
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        raise ImportError(
            f"{err.name} is needed for vzedge serve: pip install 'vzedge[serve]' (fastapi, uvicorn, prometheus_client)"
        ) from err
    return fastapi


def create_app(config: ServeConfig, engine: Engine | None = None) -> Any:
    """The FastAPI app; the engine starts loading the model when the app starts (lifespan)."""
    fastapi = _fastapi()
    from fastapi import Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from vzedge.serve.metrics import ServeMetrics

    engine = engine or Engine(config, ServeMetrics)
    metrics = engine.metrics
    created = int(time.time())
    body_limit = int(config.max_body_mb * 2**20)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        engine.start()
        yield
        await asyncio.to_thread(engine.stop, config.timeout_s)

    app = fastapi.FastAPI(title="vzedge", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine = engine
    app.state.config = config

    def count(status: int) -> None:
        if metrics is not None:
            metrics.requests.labels(status=str(status)).inc()

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, err: RequestError) -> JSONResponse:
        if request.url.path == "/v1/chat/completions":
            count(err.status)
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        hint = {404: f"no route {request.url.path}; the API is under /v1", 405: f"{request.method} is not allowed here"}
        message = hint.get(err.status_code, str(err.detail))
        return JSONResponse(error_body(message, err.status_code), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, err: Exception) -> JSONResponse:
        log.exception("request failed")
        if request.url.path == "/v1/chat/completions":
            count(500)
        return JSONResponse(error_body(f"internal error: {type(err).__name__}", 500), status_code=500)

    def check_key(request: Request) -> None:
        if config.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, key = auth.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(key.strip().encode(), config.api_key.encode()):
            raise RequestError(
                "missing or wrong API key; send the server's --api-key as 'Authorization: Bearer KEY'",
                401,
                code="invalid_api_key",
            )

    def check_ready() -> None:
        if engine.load_error is not None:
            raise RequestError(f"the model failed to load: {engine.load_error}", 503, code="model_load_failed")
        if not engine.ready.is_set():
            raise RequestError(
                "the model is still loading; retry when GET /health answers 200", 503, headers={"Retry-After": "2"}
            )

    @app.get("/health")
    async def health() -> JSONResponse:
        if engine.load_error is not None:
            return JSONResponse({"status": "error", "error": str(engine.load_error)}, status_code=503)
        if not engine.ready.is_set():
            return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "2"})
        return JSONResponse({"status": "ok", "model": config.name})

    @app.get("/metrics")
    async def prometheus() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        check_key(request)
        card: dict[str, Any] = {"id": config.name, "object": "model", "created": created, "owned_by": "vzedge"}
        if engine.ready.is_set():
            card["max_model_len"] = engine.context
            card["image_tokens"] = engine.image_tokens
            card["image_tokens_stock"] = engine.stock_tokens
            card["text_conditioned"] = engine.text_stage is not None
            if engine.adaptive is not None:
                card["image_tokens_adaptive"] = {"buckets": list(engine.adaptive.buckets), "mass": engine.adaptive.mass}
        return {"object": "list", "data": [card]}

    async def read_body(request: Request) -> Any:
        too_big = RequestError(
            f"the request body is larger than the server's limit of {config.max_body_mb:g} MB; send a smaller "
            "image or start the server with a larger --max-body-mb",
            413,
            code="body_too_large",
        )
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > 8 * body_limit:
            raise too_big  # not worth reading; the connection closes
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size <= body_limit:
                chunks.append(chunk)
            elif size > 8 * body_limit:
                raise too_big
        if size > body_limit:  # read to the end (discarded) so that the client gets the answer, not a reset
            raise too_big
        try:
            return json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RequestError(
                f"the request body is not valid JSON ({err}); send a JSON object with model and messages",
                code="invalid_json",
            ) from None

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        from starlette.concurrency import run_in_threadpool

        from vzedge.prompt import IMAGE_TOKEN, render
        from vzedge.serve.images import decode_image_url
        from vzedge.serve.schema import last_user_text, parse_request, stops_of, to_messages

        arrived = time.perf_counter()
        check_key(request)
        data = await read_body(request)
        check_ready()
        req = parse_request(data)
        if req.model != config.name:
            raise RequestError(
                f"model {req.model!r} is not served here; use {config.name!r} (GET /v1/models)",
                404,
                param="model",
                code="model_not_found",
            )
        messages, images = to_messages(req)
        if not images:
            raise RequestError(
                "this model answers questions about an image: add an image_url content part to a user message",
                param="messages",
                code="image_required",
            )
        if len(images) > config.max_images:
            raise RequestError(
                f"the conversation has {len(images)} images; this server takes {config.max_images} per conversation "
                "(start a new conversation for another image)",
                param=images[config.max_images][1],
                code="too_many_images",
            )
        url, param = images[0]
        t0 = time.perf_counter()
        image = await run_in_threadpool(decode_image_url, url, config.image_root, config.max_image_pixels, param)
        if metrics is not None:
            metrics.observe_stage("decode_image", time.perf_counter() - t0)
        prompt = render(engine.session.loaded.processor, messages)
        prefix_text, text = prompt.split(IMAGE_TOKEN, 1)
        max_tokens = req.max_completion_tokens or req.max_tokens or config.default_max_tokens
        n_prompt = engine.prompt_tokens(prefix_text, text)
        if engine.context and n_prompt + max_tokens > engine.context:
            over_prompt = n_prompt >= engine.context
            raise RequestError(
                f"the prompt is {n_prompt} tokens ({'up to ' if engine.adaptive is not None else ''}"
                f"{engine.image_tokens} of them the image) and max_tokens is "
                f"{max_tokens}, beyond the model's context of {engine.context}; "
                + ("shorten the conversation" if over_prompt else f"ask for at most {engine.context - n_prompt}"),
                param="messages" if over_prompt else "max_tokens",
                code="context_length_exceeded",
            )
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(event: tuple[str, Any]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone (shutdown): nobody to tell
                loop.call_soon_threadsafe(events.put_nowait, event)

        job = Job(
            prefix_text=prefix_text,
            text=text,
            # The text stage conditions on the current question; an image-only turn falls back to the prompt's rest.
            question=last_user_text(messages) or text.strip(),
            image=image,
            max_tokens=max_tokens,
            emit=emit,
            temperature=req.temperature,
            top_p=req.top_p,
            seed=req.seed,
            stops=stops_of(req),
            ignore_eos=req.ignore_eos,
            timeout_s=config.timeout_s,
            arrived=arrived,
        )
        engine.submit(job)
        if metrics is not None:
            metrics.prompt_tokens.inc(n_prompt - engine.image_tokens)  # the image's part once it is encoded

        def usage(info: dict[str, Any]) -> dict[str, Any]:
            # n_prompt allowed for the most image tokens (an adaptive budget's largest bucket); count the image's own.
            prompt_tokens = n_prompt - engine.image_tokens + info["visual_tokens"]
            return {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": info["completion_tokens"],
                "total_tokens": prompt_tokens + info["completion_tokens"],
                "prompt_tokens_details": {"cached_tokens": info["cached_tokens"]},
                "images": [
                    {
                        "visual_tokens": info["visual_tokens"],
                        "stock_tokens": engine.stock_tokens,
                        "cache_hit": info["cache_hit"],
                    }
                ],
            }

        async def next_event() -> tuple[str, Any]:
            """The engine's next event; checks every second whether the client is still there (a client that
            went away frees its place in the engine)."""
            give_up = time.monotonic() + config.timeout_s + 30  # the engine enforces the timeout; this is a backstop
            while True:
                try:
                    return await asyncio.wait_for(events.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        job.cancelled.set()
                        raise RequestError("the client went away", 499, code="cancelled") from None
                    if time.monotonic() > give_up:
                        job.cancelled.set()
                        raise RequestError("the engine did not answer in time", 504, code="timeout") from None

        base = {"id": job.id, "created": int(time.time()), "model": config.name}
        if not req.stream:
            try:
                while True:
                    kind, value = await next_event()
                    if kind == "error":
                        raise value
                    if kind == "done":
                        break
            finally:
                job.cancelled.set()  # no-op once done; stops the work if this handler was cancelled
            count(200)
            return {
                **base,
                "object": "chat.completion",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": value["text"]},
                        "finish_reason": value["finish_reason"],
                    }
                ],
                "usage": usage(value),
            }

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
            body = {
                **base,
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            return f"data: {json.dumps(body)}\n\n"

        # The first event decides the status: an error before any token is still a plain JSON error.
        first = await next_event()
        if first[0] == "error":
            job.cancelled.set()
            raise first[1]

        async def sse() -> AsyncIterator[str]:
            event = first
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    kind, value = event
                    if kind == "delta":
                        yield chunk({"content": value})
                    elif kind == "error":
                        yield f"data: {json.dumps(value.body())}\n\n"
                        break
                    else:
                        yield chunk({}, value["finish_reason"])
                        if include_usage:
                            last = {**base, "object": "chat.completion.chunk", "choices": [], "usage": usage(value)}
                            yield f"data: {json.dumps(last)}\n\n"
                        break
                    event = await next_event()
                yield "data: [DONE]\n\n"
            finally:
                job.cancelled.set()  # the client went away mid-stream: stop decoding for it

        count(200)
        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


def serve(config: ServeConfig) -> int:
    """Run the server until SIGTERM/SIGINT; in-flight requests finish first (bounded by the request timeout)."""
    import signal

    _fastapi()
    import uvicorn

    app = create_app(config)
    engine = app.state.engine
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            log_level="warning",
            timeout_graceful_shutdown=int(config.timeout_s) + 5,
            access_log=False,
        )
    )
    # uvicorn re-raises the signal that stopped it under the handler it found; a no-op one makes a drained
    # SIGTERM exit 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    engine.on_load_error = lambda: setattr(server, "should_exit", True)  # nothing to serve: stop at once
    server.run()
    err = engine.load_error
    if err is not None:
        if isinstance(err, (ValueError, TypeError, ImportError, FileExistsError)):
            raise err  # bad input: the CLI prints it and exits 2
        raise RuntimeError(f"loading {config.model!r} failed: {type(err).__name__}: {err}") from err
    return 0


__all__ = ["create_app", "serve"]
