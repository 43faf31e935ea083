"""`deem serve` on localhost answering the official `openai` client: plain and streamed completions, batching of
concurrent requests, and 400s with OpenAI's error body for bad requests while good ones keep being served."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import socket
import threading
import time

import httpx
import pytest
from PIL import Image

openai = pytest.importorskip("openai")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(engine, image_files):
    import uvicorn

    from deem.infer.server import create_app

    app = create_app(engine, "tiny-deem", max_batch_size=4, default_max_tokens=12,
                     file_roots=[image_files[0].parent])
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", app
    srv.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=120)


def _data_uri(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _messages(url: str, text: str = "What is in the picture?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def test_health_and_models(server, client):
    assert httpx.get(server[0] + "/health").json() == {"status": "ok"}
    assert [m.id for m in client.models.list().data] == ["tiny-deem"]


def test_plain_and_streamed_completions_agree(client, image_files):
    msgs = _messages(_data_uri(image_files[0]))
    plain = client.chat.completions.create(model="tiny-deem", messages=msgs, max_tokens=10, temperature=0)
    choice = plain.choices[0]
    assert plain.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length") and plain.usage.completion_tokens >= 1
    assert plain.usage.prompt_tokens > 4  # the image run is part of the prompt
    stream = client.chat.completions.create(model="tiny-deem", messages=msgs, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    text, finish, usage, chunks = "", None, None, 0
    for ch in stream:
        chunks += 1
        if ch.usage is not None:
            usage = ch.usage
        for c in ch.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert chunks >= 3 and text == choice.message.content and finish == choice.finish_reason
    assert usage.completion_tokens == plain.usage.completion_tokens


def test_file_urls_multi_turn_n_and_seed(client, image_files):
    url = image_files[1].resolve().as_uri()
    msgs = [{"role": "system", "content": "You describe shapes."}, *_messages(url, "Describe it."),
            {"role": "assistant", "content": "A shape."}, {"role": "user", "content": "And its colour?"}]
    a = client.chat.completions.create(model="m", messages=msgs, max_tokens=8, temperature=1.0, seed=5, n=2)
    b = client.chat.completions.create(model="m", messages=msgs, max_tokens=8, temperature=1.0, seed=5, n=2)
    assert len(a.choices) == 2 and [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    beams = client.chat.completions.create(model="m", messages=msgs, max_tokens=6, temperature=0, n=2,
                                           extra_body={"num_beams": 3, "length_penalty": 0.0})
    assert len(beams.choices) == 2


def _error(exc_info) -> dict:
    return exc_info.value.response.json()["error"]


def test_corrupt_image_is_a_400_while_a_concurrent_request_succeeds(server, client, image_files):
    good = _messages(_data_uri(image_files[0]))
    bad = _messages("data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n garbage").decode())
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        ok = [pool.submit(client.chat.completions.create, model="m", messages=good, max_tokens=16, temperature=0)
              for _ in range(3)]
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="m", messages=bad, max_tokens=4)
        results = [f.result() for f in ok]
    e = _error(err)
    assert err.value.status_code == 400 and e["type"] == "invalid_request_error" and e["code"] == "invalid_image"
    assert "corrupt image" in e["message"] and e["param"] == "messages[0].content[0]"
    assert all(r.choices[0].finish_reason in ("stop", "length") for r in results)
    assert len({r.choices[0].message.content for r in results}) == 1  # the same greedy answer in any batch
    assert max(server[1].state.scheduler.batches) >= 2  # requests that waited were decoded together


@pytest.mark.parametrize(("body", "match"), [
    ({"temperature": 3}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"n": 0}, "'n'"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"max_tokens": 5000}, "context"),
    ({"logprobs": True}, "not supported"),
])
def test_bad_parameters_are_400s(server, image_files, body, match):
    r = httpx.post(server[0] + "/v1/chat/completions",
                   json={"model": "m", "messages": _messages(_data_uri(image_files[0])), **body})
    assert r.status_code == 400, r.text
    assert match in r.json()["error"]["message"]


def test_bad_messages_are_400s(server, engine, image_files, tmp_path):
    url = server[0] + "/v1/chat/completions"
    too_many = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_uri(image_files[0])}}]
                 * (engine.max_images + 1)}]
    outside = tmp_path / "elsewhere.png"
    Image.new("RGB", (8, 8)).save(outside)
    cases = [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "role"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, "last message"),
        ({"messages": too_many}, "at most"),
        ({"messages": _messages("https://example.com/cat.png")}, "network"),
        ({"messages": _messages(outside.as_uri())}, "outside"),
        ({"messages": [{"role": "user", "content": "a " * 600}]}, "context"),
    ]
    for body, match in cases:
        r = httpx.post(url, json={"model": "m", **body})
        assert r.status_code == 400 and match in r.json()["error"]["message"], (body, r.text)
    r = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    buf = io.BytesIO()
    Image.new("RGB", (10, 10), (200, 10, 10)).save(buf, "PNG")
    ok = httpx.post(url, json={"model": "m", "max_tokens": 3, "messages": _messages(
        "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())}, timeout=120)
    assert ok.status_code == 200  # still serving
