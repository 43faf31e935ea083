"""`deem generate` and `deem chat` on the tiny checkpoint."""

from __future__ import annotations

import io

from rich.console import Console

from deem.cli import main
from deem.infer import SamplingParams, Turn
from deem.infer.chat import run_chat


def test_generate_prints_the_engines_answer(checkpoint, image_files, engine, capsys):
    args = ["generate", "--checkpoint", str(checkpoint), "--device", "cpu", "--image", str(image_files[0]),
            "--prompt", "What is in the picture?", "--max-new-tokens", "10"]
    assert main(args) == 0
    printed = capsys.readouterr().out.strip()
    image = engine.prepare_image(image_files[0])
    expected = engine.generate([engine.chat_request([Turn("user", [image, "What is in the picture?"])],
                                                    SamplingParams(max_new_tokens=10))])[0].text
    assert printed == expected.strip() and printed
    assert main([*args, "--stream"]) == 0
    assert capsys.readouterr().out.strip() == printed


def test_generate_placeholders_beams_and_errors(checkpoint, image_files, capsys):
    base = ["generate", "--checkpoint", str(checkpoint), "--device", "cpu"]
    assert main([*base, "--image", str(image_files[0]), "--image", str(image_files[1]), "--prompt",
                 "Compare <image> with <image>.", "--num-beams", "3", "--n", "2", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("[0] ") and "\n[1] " in out
    assert main([*base, "--image", str(image_files[0]), "--prompt", "<image> and <image>?"]) == 2
    assert "2 <image> placeholders for 1 images" in capsys.readouterr().err
    assert main([*base, "--image", "/no/such.png", "--prompt", "hi"]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(image_files[0].parent), "--prompt", "hi"]) == 2
    assert "not a deem checkpoint" in capsys.readouterr().err


def test_chat_keeps_the_conversation_and_its_images(engine, image_files):
    lines = iter([f"/image {image_files[0]}", "What is this?", "/set max_new_tokens 5", "And the colour?",
                  "/image /missing.png", "/set nope 1", "/reset", "Hello", "/quit"])
    out = io.StringIO()
    console = Console(file=out, width=200, color_system=None)
    seen = []
    real_generate = engine.generate

    def spy(requests, on_event=None):
        seen.append(requests[0])
        return real_generate(requests, on_event)

    engine.generate = spy
    try:
        assert run_chat(engine, SamplingParams(max_new_tokens=8), read=lambda _p: next(lines), console=console) == 0
    finally:
        del engine.generate
    text = out.getvalue()
    assert "image" in text and "attached" in text and "not found" in text and "unknown setting" in text
    first, second, third = seen
    assert len(first.images) == 1 and len(second.images) == 1  # the image stays in the history
    assert len(second.prompt_ids) > len(first.prompt_ids) and second.params.max_new_tokens == 5
    answer = engine.tokenizer.decode(engine.generate([first])[0].sequences[0].tokens, skip_special_tokens=True)
    assert answer.strip() in text  # streamed to the console
    assert len(third.images) == 0 and len(third.prompt_ids) < len(first.prompt_ids)  # /reset


def test_serve_command_builds_the_app(checkpoint, monkeypatch):
    import uvicorn
    from fastapi.testclient import TestClient

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, log_level: seen.update(app=app, host=host, port=port))
    assert main(["serve", "--checkpoint", str(checkpoint), "--device", "cpu", "--port", "8123",
                 "--model-name", "tiny", "--max-tokens", "4"]) == 0
    assert (seen["host"], seen["port"]) == ("127.0.0.1", 8123)
    with TestClient(seen["app"]) as client:
        assert client.get("/health").json() == {"status": "ok"}
        assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
        r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user",
                                                                                       "content": "a red"}]})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 4
