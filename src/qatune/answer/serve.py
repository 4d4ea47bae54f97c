"""`qatune serve`: a question-answering HTTP server over a :class:`~qatune.answer.inference.Reader` (FastAPI + uvicorn).

``POST /answer`` takes ``{"question", "context", "top_k": 1}`` or a list of them and answers each with a list of
``{"answer", "score", "start", "end"}``, best first (``start``/``end``: character offsets into the context; the
contract of the transformers question-answering pipeline, so its clients work unchanged). ``GET /health`` says what
is loaded; OpenAPI docs are at ``/docs``.

Requests that arrive together are answered together: one thread takes what is queued (up to ``max_batch``
questions, waiting at most ``batch_wait_ms`` for more) and answers it in one ``Reader.answer_many`` call, so
concurrent clients share forward passes. Bad input never reaches the model: a body or context above the limits
answers 413, malformed JSON, a missing field, a wrong type or an empty question 422 with a message naming the field;
an unexpected failure answers 500 without internals, and the server keeps serving.
"""

import asyncio
import difflib
import errno
import json
import logging
import queue
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

from qatune.answer.inference import Reader, require
from qatune.data.squad import kind, text_problem
from qatune.errors import ConfigError, QatuneError

log = logging.getLogger("qatune.answer.serve")
MAX_TOP_K = 20
ITEM_SCHEMA = {
    "type": "object",
    "required": ["question", "context"],
    "properties": {
        "question": {"type": "string", "minLength": 1, "description": "the question (not empty)"},
        "context": {"type": "string", "minLength": 1, "description": "the text that holds the answer"},
        "top_k": {"type": "integer", "minimum": 1, "maximum": MAX_TOP_K, "default": 1,
                  "description": "how many answers, best first"},
    },
}
ANSWER_SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string"}, "score": {"type": "number", "description": "probability"},
                   "start": {"type": "integer"}, "end": {"type": "integer"}},
}


class RequestError(Exception):
    """A request the server refuses: HTTP status, where in the body, and why."""

    def __init__(self, status: int, where: str, message: str):
        super().__init__(f"{where}: {message}")
        self.status, self.where, self.message = status, where, message


FIELDS = {"question", "context", "top_k"}  # of one request item
BODY_TIMEOUT_S = 30.0  # a client that sends its body slower than this is answered 408, not waited for


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 1_000_000
    max_context_chars: int = 100_000
    max_items: int = 64  # questions in one request


def parse_items(body: bytes, limits: Limits) -> tuple[list[tuple[str, str, int]], bool]:
    """The (question, context, top_k) items of a request body and whether it was a list; RequestError otherwise."""
    try:
        obj = json.loads(body)
    except RecursionError:  # thousands of nested brackets: no request needs them
        raise RequestError(422, "body", "JSON nested too deeply; send one {question, context} object or a list "
                                        "of them") from None
    except ValueError as e:  # not JSON, not UTF-8, or an integer of thousands of digits (Python's int limit)
        raise RequestError(422, "body", f"not valid JSON ({getattr(e, 'msg', e)})") from None
    many = isinstance(obj, list)
    records = obj if many else [obj]
    if many and not records:
        raise RequestError(422, "body", "an empty list; send one {question, context} object or a list of them")
    if len(records) > limits.max_items:
        raise RequestError(413, "body", f"{len(records)} questions in one request, above the limit of "
                                        f"{limits.max_items}; split the list")
    items = []
    for i, rec in enumerate(records):
        where = f"body[{i}]" if many else "body"
        if not isinstance(rec, dict):
            raise RequestError(422, where, f"expected an object with question and context, got {kind(rec)}")
        for key in ("question", "context"):
            if problem := text_problem(rec, key):
                raise RequestError(422, f"{where}.{key}", problem)
        unknown = sorted(set(rec) - FIELDS)
        if unknown:
            near = difflib.get_close_matches(unknown[0], FIELDS, n=1)
            raise RequestError(422, f"{where}.{unknown[0]}", "unknown field" + (f" (did you mean {near[0]}?)" if near
                                                                               else f"; fields: {sorted(FIELDS)}"))
        top_k = rec.get("top_k", 1)
        if not isinstance(top_k, int) or isinstance(top_k, bool):
            raise RequestError(422, f"{where}.top_k", f"must be an integer, got {kind(top_k)}")
        if not 1 <= top_k <= MAX_TOP_K:
            raise RequestError(422, f"{where}.top_k", f"must be between 1 and {MAX_TOP_K}, got {top_k}")
        if len(rec["context"]) > limits.max_context_chars:
            raise RequestError(413, f"{where}.context", f"{len(rec['context']):,} characters, above the limit of "
                                                        f"{limits.max_context_chars:,}")
        items.append((rec["question"], rec["context"], top_k))
    return items, many


def to_pipeline(answer: dict) -> dict:
    """A Reader answer in the pipeline's shape; "no answer" (start -1) is "" at 0-0, as the pipeline gave it."""
    start, end = (answer["start"], answer["end"]) if answer["start"] >= 0 else (0, 0)
    return {"answer": answer["text"], "score": answer["probability"], "start": start, "end": end}


class MicroBatcher:
    """One thread answering queued requests together (up to ``max_batch`` questions per ``answer_many`` call)."""

    def __init__(self, reader: Reader, max_batch: int = 32, wait_s: float = 0.002):
        self.reader, self.max_batch, self.wait_s = reader, max_batch, wait_s
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="qatune-batcher", daemon=True)
        self._thread.start()

    async def answer(self, items: list[tuple[str, str, int]]) -> list[list[dict]]:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put((items, loop, future))
        return await future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            jobs, size = [job], len(job[0])
            deadline = time.monotonic() + self.wait_s
            while size < self.max_batch:
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)  # stop after this batch
                    break
                jobs.append(nxt)
                size += len(nxt[0])
            self._answer(jobs)

    def _answer(self, jobs: list) -> None:
        items = [it for items, _, _ in jobs for it in items]
        answers, error = None, None
        try:
            answers = self.reader.answer_many([(q, c) for q, c, _ in items], max(k for _, _, k in items))
        except Exception as e:  # noqa: BLE001 - handed to the request; it must not fail others batched with it
            if len(jobs) > 1:
                for job in jobs:
                    self._answer([job])
                return
            error = e
        k = 0
        for job_items, loop, future in jobs:
            if answers is None:
                result = error
            else:
                result = [a[:top_k] for a, (_, _, top_k) in zip(answers[k : k + len(job_items)], job_items)]
            k += len(job_items)
            loop.call_soon_threadsafe(_settle, future, result)


def _settle(future: asyncio.Future, result) -> None:
    if future.done():  # the client went away
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


def create_app(reader: Reader, max_batch: int = 32, batch_wait_ms: float = 2.0, limits: Limits | None = None,
               model_name: str = ""):
    """The FastAPI application answering with ``reader`` (tests run it in-process or on a loopback server)."""
    fastapi = require("fastapi", "serve")
    from fastapi.responses import JSONResponse

    limits = limits or Limits()
    state: dict = {}

    @asynccontextmanager
    async def lifespan(app):
        state["batcher"] = MicroBatcher(reader, max_batch, batch_wait_ms / 1000)
        try:
            yield
        finally:
            state.pop("batcher").close()

    app = fastapi.FastAPI(title="qatune reader", lifespan=lifespan,
                          description="Extractive question answering: the answer is a span of the context.")

    def refuse(e: RequestError) -> JSONResponse:
        detail = [{"loc": e.where.replace("]", "").replace("[", ".").split("."), "msg": e.message}]
        return JSONResponse({"detail": detail, "message": str(e)}, status_code=e.status)

    @app.exception_handler(Exception)
    async def internal_error(request, exc):  # no traceback to the client; the log has it
        log.exception("error answering %s", request.url.path)
        return JSONResponse({"detail": "internal server error", "message": "internal server error"}, status_code=500)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_name, "format": "onnx" if reader.is_onnx else "torch",
                "device": str(reader.device), "precision": reader.precision, "version_2": reader.config.version_2}

    @app.post("/answer", openapi_extra={
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "oneOf": [ITEM_SCHEMA, {"type": "array", "items": ITEM_SCHEMA, "maxItems": limits.max_items}]}}}},
        "responses": {"200": {"description": "answers, best first (a list of lists for a list of questions)",
                              "content": {"application/json": {"schema": {"oneOf": [
                                  {"type": "array", "items": ANSWER_SCHEMA},
                                  {"type": "array", "items": {"type": "array", "items": ANSWER_SCHEMA}}]}}}},
                      "413": {"description": "body, list or context above the limits"},
                      "422": {"description": "malformed JSON, a missing field, a wrong type or an empty question"}}})
    async def answer(request: fastapi.Request):
        from starlette.requests import ClientDisconnect

        try:
            kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json":
                raise RequestError(415, "content-type", f"{kind or 'none'}; send the body as application/json")
            if request.query_params:  # e.g. ?top_k=3, which would otherwise be ignored without a word
                name = next(iter(request.query_params))
                raise RequestError(422, f"query.{name}", f"the URL's parameters are not read; put "
                                   f"{name if name in FIELDS else 'every field'} in the JSON body")
            body = await asyncio.wait_for(_read_body(request, limits.max_body_bytes), BODY_TIMEOUT_S)
            items, many = parse_items(body, limits)
        except RequestError as e:
            return refuse(e)
        except TimeoutError:
            return refuse(RequestError(408, "body", f"not received within {BODY_TIMEOUT_S:.0f} s"))
        except ClientDisconnect:  # the client left before sending its body: nobody to answer
            log.info("client disconnected before its request body was complete")
            return fastapi.Response(status_code=400)
        try:
            answers = await state["batcher"].answer(items)
        except QatuneError as e:  # e.g. a question too long for the model's windows
            return refuse(RequestError(422, "body", str(e)))
        out = [[to_pipeline(a) for a in per_item] for per_item in answers]
        return out if many else out[0]

    return app


async def _read_body(request, max_bytes: int) -> bytes:
    """The request body, refused (413) as soon as it is known to exceed ``max_bytes``."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise RequestError(413, "body", f"{int(declared):,} bytes, above the limit of {max_bytes:,}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise RequestError(413, "body", f"more than {max_bytes:,} bytes, above the limit")
        chunks.append(chunk)
    return b"".join(chunks)


def check_address(host: str, port: int) -> None:
    """Bind the address once before the model loads: a port in use or a host that is not this machine's fails in
    a second with one line, not after the load with uvicorn's."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise ConfigError(f"--host {host!r} is not an address this machine can listen on ({e}); give an IP address "
                          f"or host name of this machine, e.g. 127.0.0.1 or 0.0.0.0") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ConfigError(f"cannot listen on {host}:{port}: the port is in use; choose another --port, or "
                                  f"stop what holds it") from None
            raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}; give an address of this machine "
                              f"with --host") from None


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, device: str | None = None,
          threads: int | None = None, max_batch: int = 32, batch_wait_ms: float = 2.0,
          max_body_bytes: int = 1_000_000, max_context_chars: int = 100_000) -> None:
    """Load ``model`` and serve it until interrupted."""
    uvicorn = require("uvicorn", "serve")
    require("fastapi", "serve")

    for name, value in (("--port", port), ("--max-batch", max_batch), ("--max-body-bytes", max_body_bytes),
                        ("--max-context-chars", max_context_chars)):
        if value < (0 if name == "--port" else 1) or (name == "--port" and value > 65535):
            raise ConfigError(f"{name} must be {'0-65535' if name == '--port' else '>= 1'}, got {value}")
    if batch_wait_ms < 0:
        raise ConfigError(f"--batch-wait-ms must be >= 0, got {batch_wait_ms}")
    check_address(host, port)
    reader = Reader.load(model, device=device, threads=threads)
    app = create_app(reader, max_batch, batch_wait_ms, Limits(max_body_bytes, max_context_chars), model_name=model)
    uvicorn.run(app, host=host, port=port, log_level="info")
