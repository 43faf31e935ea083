"""`deem serve`: an OpenAI-compatible HTTP server over the engine (FastAPI + uvicorn).

    POST /v1/chat/completions   chat completions, plain or streamed as server-sent events (see openai_api.py)
    GET  /v1/models             the served model
    GET  /health                {"status": "ok"}

Requests are validated and their images decoded in the request's own worker thread; a bad request gets a 400 with
OpenAI's error body and never reaches the model. One scheduler thread owns the engine: whenever the model is free
it takes every waiting request (up to the batch size) and decodes them as one engine batch, so requests that
arrive while the model is busy are batched together.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse

from deem.infer.engine import InferenceEngine, TokenEvent
from deem.infer.inputs import image_url_bytes
from deem.infer.openai_api import (
    ApiError,
    chunk,
    completion_body,
    models_body,
    new_id,
    parse_chat,
    usage_chunk,
)
from deem.infer.request import InferenceError, Request

log = logging.getLogger("deem.serve")


@dataclass
class _Job:
    request: Request
    future: concurrent.futures.Future
    on_event: Callable[[TokenEvent], None] | None


class Scheduler:
    """The thread that runs the engine; `submit` returns a future of the request's `Completion`."""

    def __init__(self, engine: InferenceEngine, max_batch_size: int = 8) -> None:
        self.engine = engine
        self.max_batch_size = max_batch_size
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="deem-scheduler", daemon=True)
        self.batches: list[int] = []  # size of every engine batch run (observability, tests)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def submit(self, request: Request, on_event: Callable[[TokenEvent], None] | None = None
               ) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put(_Job(request, future, on_event))
        return future

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            jobs = [job]
            while len(jobs) < self.max_batch_size:  # everything that queued up while the model was busy
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)
                    break
                jobs.append(more)
            self._run(jobs)

    def _run(self, jobs: list[_Job]) -> None:
        valid = []
        for job in jobs:
            try:
                self.engine.check(job.request)
                valid.append(job)
            except InferenceError as exc:
                job.future.set_exception(exc)
        if not valid:
            return
        self.batches.append(len(valid))

        def dispatch(event: TokenEvent) -> None:
            cb = valid[event.request].on_event
            if cb is not None:
                cb(event)

        try:
            completions = self.engine.generate([j.request for j in valid], on_event=dispatch)
        except Exception as exc:  # the batch fails, the server keeps serving
            log.exception("generation failed for a batch of %d requests", len(valid))
            for job in valid:
                job.future.set_exception(exc)
            return
        for job, completion in zip(valid, completions):
            job.future.set_result(completion)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(engine: InferenceEngine, model_name: str = "deem", *, max_batch_size: int = 8,
               default_max_tokens: int = 256, max_n: int = 8, max_images: int | None = None,
               file_roots: Sequence[str | Path] | None = None):
    """The FastAPI application (its scheduler starts and stops with the app). `file_roots`: directories whose
    files `file://` image URLs may name (None: any readable file)."""
    scheduler = Scheduler(engine, max_batch_size)
    created = int(time.time())
    image_limit = engine.max_images if max_images is None else min(max_images, engine.max_images)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="deem", lifespan=lifespan)
    app.state.scheduler = scheduler

    def error(exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    def load_image(url: str, param: str):
        return engine.prepare_image(image_url_bytes(url, file_roots, param), param)

    def prepare(body: Any) -> tuple[Any, Request]:
        call = parse_chat(body, load_image, default_max_tokens, max_n)
        try:
            request = engine.chat_request(call.turns, call.params, call.system)
        except InferenceError as exc:
            raise ApiError(str(exc), "messages") from None
        if len(request.images) > image_limit:
            raise ApiError(f"{len(request.images)} images in the conversation; this server takes at most "
                           f"{image_limit}", "messages", code="too_many_images")
        room = engine.context - len(request.prompt_ids)
        if room < 1:
            raise ApiError(f"the prompt has {len(request.prompt_ids)} tokens; the model's context is "
                           f"{engine.context}", "messages", code="context_length_exceeded")
        if not call.max_tokens_given and call.params.max_new_tokens > room:
            request.params = call.params.replace(max_new_tokens=room,
                                                 min_new_tokens=min(call.params.min_new_tokens, room))
        try:
            engine.check(request)
        except InferenceError as exc:
            code = "context_length_exceeded" if "context" in str(exc) else None
            raise ApiError(str(exc), "messages", code=code) from None
        return call, request

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return models_body([model_name], created)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest):
        try:
            body = json.loads(await http.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return error(ApiError("the request body is not valid JSON"))
        try:
            call, request = await run_in_threadpool(prepare, body)
        except ApiError as exc:
            return error(exc)
        cid = new_id()
        if not call.stream:
            try:
                completion = await asyncio.wrap_future(scheduler.submit(request))
            except InferenceError as exc:
                return error(ApiError(str(exc)))
            except Exception as exc:
                return error(ApiError(f"generation failed: {type(exc).__name__}: {exc}", status=500,
                                      kind="server_error"))
            return completion_body(cid, model_name, completion)
        return StreamingResponse(_stream(scheduler, request, call, cid, model_name), media_type="text/event-stream")

    return app


async def _stream(scheduler: Scheduler, request: Request, call, cid: str, model: str):
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    finished = object()
    future = scheduler.submit(request, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
    future.add_done_callback(lambda _f: loop.call_soon_threadsafe(events.put_nowait, finished))
    created = int(time.time())
    for k in range(call.params.n):
        yield _sse(chunk(cid, model, created, k, {"role": "assistant", "content": ""}))
    while True:
        ev = await events.get()
        if ev is finished:
            break
        if ev.text:
            yield _sse(chunk(cid, model, created, ev.sequence, {"content": ev.text}))
        if ev.finish_reason is not None:
            yield _sse(chunk(cid, model, created, ev.sequence, {}, ev.finish_reason))
    exc = future.exception()
    if exc is not None:
        kind = "invalid_request_error" if isinstance(exc, InferenceError) else "server_error"
        yield _sse(ApiError(f"generation failed: {exc}", kind=kind).body())
    elif call.include_usage:
        yield _sse(usage_chunk(cid, model, created, future.result()))
    yield "data: [DONE]\n\n"


def serve(engine: InferenceEngine, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          **app_kwargs: Any) -> None:
    """Run the server until interrupted."""
    import uvicorn

    uvicorn.run(create_app(engine, **app_kwargs), host=host, port=port, log_level=log_level)
