"""`qatune serve`: answers equal Reader's under concurrent load on loopback; bad requests get their 4xx."""

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from qatune.answer.inference import Reader
from tests.runs import CONTEXT, qa_data, tiny_run  # noqa: F401 - fixtures

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from qatune.answer.serve import Limits, create_app, to_pipeline  # noqa: E402


@pytest.fixture(scope="module")
def reader(tiny_run):
    return Reader.load(tiny_run, device="cpu")


@pytest.fixture(scope="module")
def server(reader):
    """The app on a loopback uvicorn server in a thread: its base URL."""
    app = create_app(reader, max_batch=8, batch_wait_ms=5, limits=Limits(max_body_bytes=20_000,
                                                                         max_context_chars=2_000, max_items=8))
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error", lifespan="on"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


def post(url: str, body, raw: bytes | None = None, headers: dict | None = None) -> tuple[int, object]:
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url + "/answer", data=data, headers={"Content-Type": "application/json",
                                                                      **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def same(got: list[dict], want: list[dict]) -> bool:
    """The same answers (text and offsets exactly; scores to float rounding: batched with other requests, windows
    are padded to other widths)."""
    strip = lambda xs: [(a["answer"], a["start"], a["end"]) for a in xs]  # noqa: E731
    return strip(got) == strip(want) and [a["score"] for a in got] == pytest.approx([a["score"] for a in want],
                                                                                   abs=1e-5)


QUESTIONS = [f"What is the {t} of {p} called?" for t in ("bridge", "river", "castle") for p in ("Marlow", "Kestrel")]


def test_concurrent_requests_get_the_readers_answers(server, reader):
    contexts = [CONTEXT, CONTEXT + " The river of Kestrel is called Amaranth12.", CONTEXT * 3]
    cases = [(q, c, 1 + i % 3) for i, (q, c) in enumerate((q, c) for q in QUESTIONS for c in contexts)]
    expected = [[to_pipeline(a) for a in reader.answer(q, c, k)] for q, c, k in cases]

    def ask(i):
        q, c, k = cases[i]
        return post(server, {"question": q, "context": c, "top_k": k})

    with ThreadPoolExecutor(8) as pool:  # 18 requests from 8 threads at once: micro-batched together
        got = list(pool.map(ask, range(len(cases))))
    for (status, body), want, (_, c, k) in zip(got, expected, cases):
        assert status == 200
        assert len(body) == k and same(body, want)
        for a in body:
            assert c[a["start"] : a["end"]] == a["answer"]
    status, body = post(server, [{"question": q, "context": c, "top_k": k} for q, c, k in cases[:4]])
    assert status == 200 and all(same(b, w) for b, w in zip(body, expected[:4], strict=True))


def test_health_and_docs(server):
    with urllib.request.urlopen(server + "/health") as r:
        health = json.loads(r.read())
    assert health["status"] == "ok" and health["format"] == "torch" and health["precision"] == "fp32"
    with urllib.request.urlopen(server + "/openapi.json") as r:
        spec = json.loads(r.read())
    assert "/answer" in spec["paths"] and "/health" in spec["paths"]
    with urllib.request.urlopen(server + "/docs") as r:
        assert r.status == 200


BAD = [  # (raw body or JSON, expected status, words of the message)
    (b'{"question": "Who?", "context": ', 422, "not valid JSON"),
    ({"context": CONTEXT}, 422, "body.question: field required"),
    ({"question": "Who?"}, 422, "body.context: field required"),
    ({"question": 5, "context": CONTEXT}, 422, "body.question: must be a string, got a number"),
    ({"question": "   ", "context": CONTEXT}, 422, "body.question: must not be empty"),
    ({"question": "Who?", "context": ""}, 422, "body.context: must not be empty"),
    ({"question": "Who?", "context": CONTEXT, "top_k": 0}, 422, "body.top_k: must be between 1 and 20"),
    ({"question": "Who?", "context": CONTEXT, "top_k": "3"}, 422, "body.top_k: must be an integer"),
    ([], 422, "an empty list"),
    ([{"question": "Who?", "context": CONTEXT}, "text"], 422, "body[1]: expected an object"),
    ("just a string", 422, "expected an object"),
    ({"question": "Who?", "context": "x " * 1500}, 413, "body.context: 3,000 characters, above the limit of 2,000"),
    ([{"question": "Who?", "context": CONTEXT}] * 9, 413, "9 questions in one request, above the limit of 8"),
    ({"question": "Who?", "context": "y" * 1000, "pad": "z" * 30_000}, 413, "above the limit of 20,000"),
    ({"question": "why " * 120, "context": CONTEXT}, 422, "tokens, leaving"),  # too long for the model's windows
    (b"[" * 5000 + b"]" * 5000, 422, "nested too deeply"),  # hostile: Python's parser would hit its recursion limit
    (b'{"question": "Who?", "context": "x", "top_k": ' + b"9" * 5000 + b"}", 422, "not valid JSON"),  # huge integer
    (b'{"question": "Who\\ud800?", "context": "x"}', 422, "body.question: is not valid Unicode"),  # lone surrogate
    (b'{"question": "Caf\xe9?", "context": "x"}', 422, "not valid JSON"),  # a byte that is not UTF-8
    ({"question": "Who?", "context": CONTEXT, "topk": 3}, 422, "body.topk: unknown field (did you mean top_k?)"),
]


@pytest.mark.parametrize("body,status,words", BAD, ids=[f"{s}-{w[:24]}" for _, s, w in BAD])
def test_bad_requests_get_their_4xx_and_the_server_stays_up(server, body, status, words):
    code, reply = post(server, None if isinstance(body, bytes) else body, raw=body if isinstance(body, bytes) else None)
    assert code == status
    assert words in reply["message"], reply
    assert "Traceback" not in json.dumps(reply)
    ok, answers = post(server, {"question": QUESTIONS[0], "context": CONTEXT})
    assert ok == 200 and answers[0]["answer"] == CONTEXT[answers[0]["start"] : answers[0]["end"]]


def test_a_body_not_declared_as_json_is_refused(server):
    code, reply = post(server, {"question": "Who?", "context": CONTEXT}, headers={"Content-Type": "text/plain"})
    assert code == 415 and "application/json" in reply["message"]


def test_a_parameter_in_the_url_is_refused_not_ignored(server):
    req = urllib.request.Request(server + "/answer?top_k=3", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"question": "Who?", "context": CONTEXT}).encode())
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=60)
    code, reply = e.value.code, json.loads(e.value.read())
    assert code == 422 and "put top_k in the JSON body" in reply["message"] and reply["detail"][0]["loc"] == \
        ["query", "top_k"]


def test_a_client_that_leaves_mid_body_costs_one_log_line_not_a_traceback(server, caplog):
    import socket
    from urllib.parse import urlparse

    caplog.set_level(logging.INFO)
    uvicorn_log = logging.getLogger("uvicorn.error")  # uvicorn's loggers do not reach the root logger
    uvicorn_log.addHandler(caplog.handler)
    url = urlparse(server)
    with socket.create_connection((url.hostname, url.port)) as s:
        s.sendall(b"POST /answer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                  b'{"questio')
    time.sleep(0.5)
    uvicorn_log.removeHandler(caplog.handler)
    assert "client disconnected before its request body was complete" in caplog.text
    assert "Traceback" not in caplog.text and "Exception in ASGI application" not in caplog.text
    ok, answers = post(server, {"question": QUESTIONS[0], "context": CONTEXT})
    assert ok == 200


def test_a_failing_model_answers_500_without_internals(reader):
    from fastapi.testclient import TestClient

    class Broken:
        is_onnx, device, precision, config = False, "cpu", "fp32", reader.config

        def answer_many(self, items, top_k=1):
            raise RuntimeError("secret internal detail")

    with TestClient(create_app(Broken()), raise_server_exceptions=False) as client:
        r = client.post("/answer", json={"question": "Who?", "context": CONTEXT})
        assert r.status_code == 500 and "secret" not in r.text and "Traceback" not in r.text
        assert client.get("/health").status_code == 200


def test_requests_queued_together_are_answered_in_one_batch():
    """While the model answers one batch, requests queue up; the next call answers them together."""
    import asyncio

    from qatune.answer.serve import MicroBatcher

    release, calls = threading.Event(), []

    class Recording:
        def answer_many(self, items, top_k=1):
            calls.append(len(items))
            if len(calls) == 1:
                release.wait(10)
            return [[{"text": q, "start": 0, "end": 1, "score": 0.0, "probability": 1.0}] * top_k for q, _ in items]

    batcher = MicroBatcher(Recording(), max_batch=16, wait_s=0.0)

    async def main():
        first = asyncio.ensure_future(batcher.answer([("first", "c", 1)]))
        while not calls:
            await asyncio.sleep(0.01)
        rest = [asyncio.ensure_future(batcher.answer([(f"q{i}", "c", 1 + i % 2)] * 2)) for i in range(4)]
        await asyncio.sleep(0.05)
        release.set()
        return await first, await asyncio.gather(*rest)

    try:
        first, rest = asyncio.run(main())
    finally:
        batcher.close()
    assert calls == [1, 8]  # the four queued requests (2 questions each) in one call
    assert first == [[{"text": "first", "start": 0, "end": 1, "score": 0.0, "probability": 1.0}]]
    assert [[len(a) for a in r] for r in rest] == [[1, 1], [2, 2], [1, 1], [2, 2]]  # each its own top_k
    assert [r[0][0]["text"] for r in rest] == ["q0", "q1", "q2", "q3"]


def test_no_answer_in_the_pipeline_shape_and_first_when_abstaining():
    from qatune.answer.inference import _null_first_if_predicted

    span = {"text": "Kestrel7", "start": 31, "end": 39, "score": 3.0, "probability": 0.4}
    null = {"text": "", "start": -1, "end": -1, "score": 4.0, "probability": 0.6}
    assert to_pipeline(null) == {"answer": "", "score": 0.6, "start": 0, "end": 0}
    assert to_pipeline(span) == {"answer": "Kestrel7", "score": 0.4, "start": 31, "end": 39}
    assert _null_first_if_predicted([null, span], abstain=True) == [null, span]
    assert _null_first_if_predicted([null, span], abstain=False) == [span, null]  # the threshold said: answer
