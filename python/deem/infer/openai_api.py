"""The OpenAI chat-completions format: parsing a request body into an engine request (every problem is an
`ApiError` that the server answers with HTTP 400 and OpenAI's error body) and building responses and stream chunks.

Supported: `messages` (system / user / assistant; user content as a string or parts `{"type": "text"}` and
`{"type": "image_url", "image_url": {"url": "data:image/...;base64,..." | "file:///..."}}`), `max_tokens` /
`max_completion_tokens`, `temperature`, `top_p`, `n`, `seed`, `stop`, `stream` (+ `stream_options.include_usage`).
Extensions (send them with the client's `extra_body`): `num_beams`, `length_penalty`, `repetition_penalty`,
`min_tokens`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from deem.infer.inputs import Turn
from deem.infer.request import Completion, InferenceError, SamplingParams

# accepted and ignored when at their neutral value (clients send them by default)
NEUTRAL = {"frequency_penalty": 0, "presence_penalty": 0, "logprobs": False, "top_logprobs": None, "tools": None,
           "tool_choice": None, "parallel_tool_calls": None, "functions": None, "response_format": None,
           "logit_bias": None}
IGNORED = {"model", "user", "metadata", "store", "service_tier", "stream_options", "modalities", "reasoning_effort"}
EXTENSIONS = {"num_beams", "length_penalty", "repetition_penalty", "min_tokens"}
KNOWN = {"messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "seed", "stop", "stream",
         *NEUTRAL, *IGNORED, *EXTENSIONS}


class ApiError(Exception):
    """A request the server refuses: HTTP `status` with OpenAI's error object."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.kind, self.code = message, param, status, kind, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class ChatCall:
    """A parsed chat-completions request."""

    turns: list[Turn]
    system: str | None
    params: SamplingParams
    stream: bool
    include_usage: bool
    max_tokens_given: bool


def _number(body: dict, key: str, default, lo=None, hi=None, integer: bool = False):
    value = body.get(key, default)
    if value is None:
        return default
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool):
        raise ApiError(f"'{key}' must be {'an integer' if integer else 'a number'}, got {value!r}", key)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ApiError(f"'{key}' must be in [{lo}, {hi}], got {value!r}", key)
    return value


def _text_content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise ApiError(f"{where}: expected a string or a list of text parts", where)


def parse_chat(body: Any, load_image: Callable[[str, str], Any], default_max_tokens: int, max_n: int) -> ChatCall:
    """Validate a request body; `load_image(url, param)` turns an image URL into a prepared image (raising
    `InferenceError` for a bad one)."""
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object")
    unknown = sorted(set(body) - KNOWN)
    if unknown:
        raise ApiError(f"unsupported parameters: {unknown}", unknown[0])
    for key, neutral in NEUTRAL.items():
        if key in body and body[key] not in (neutral, None, [], {"type": "text"}):
            raise ApiError(f"'{key}' is not supported by this server", key)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError("'messages' must be a non-empty list", "messages")
    turns: list[Turn] = []
    system = None
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or "role" not in m:
            raise ApiError(f"{where} must be an object with a 'role'", where)
        role, content = m["role"], m.get("content")
        if role in ("system", "developer"):
            text = _text_content(content, f"{where}.content")
            system = text if system is None else system + "\n" + text
        elif role == "assistant":
            turns.append(Turn("assistant", [_text_content(content, f"{where}.content")]))
        elif role == "user":
            turns.append(Turn("user", _user_parts(content, f"{where}.content", load_image)))
        else:
            raise ApiError(f"{where}: unsupported role {role!r} (system, user, assistant)", f"{where}.role")
    if not turns or turns[-1].role != "user":
        raise ApiError("the last message must come from the user", "messages")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    given = max_tokens is not None
    key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = _number({key: max_tokens}, key, default_max_tokens, 1, None, integer=True)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError("'stop' must be a non-empty string or a list of at most 4 of them", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError("'stream' must be a boolean", "stream")
    options = body.get("stream_options") or {}
    try:
        params = SamplingParams(
            max_new_tokens=max_tokens,
            min_new_tokens=_number(body, "min_tokens", 0, 0, max_tokens, integer=True),
            temperature=float(_number(body, "temperature", 1.0, 0, 2)),
            top_p=float(_number(body, "top_p", 1.0, 0, 1)),
            seed=_number(body, "seed", None, integer=True),
            num_beams=_number(body, "num_beams", 1, 1, 16, integer=True),
            length_penalty=float(_number(body, "length_penalty", 1.0)),
            repetition_penalty=float(_number(body, "repetition_penalty", 1.0, 0)),
            n=_number(body, "n", 1, 1, max_n, integer=True),
            stop=tuple(stop),
        )
    except InferenceError as exc:
        raise ApiError(str(exc)) from None
    return ChatCall(turns, system, params, stream, bool(isinstance(options, dict) and options.get("include_usage")),
                    given)


def _user_parts(content: Any, where: str, load_image) -> list:
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list) or not content:
        raise ApiError(f"{where}: expected a string or a non-empty list of content parts", where)
    parts: list = []
    for j, part in enumerate(content):
        pw = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise ApiError(f"{pw}: a text part needs a 'text' string", pw)
            parts.append(part["text"])
        elif kind == "image_url":
            spec = part.get("image_url")
            url = spec.get("url") if isinstance(spec, dict) else spec
            if not isinstance(url, str):
                raise ApiError(f"{pw}: an image_url part needs {{'url': ...}}", pw)
            try:
                parts.append(load_image(url, pw))
            except InferenceError as exc:
                raise ApiError(str(exc), pw, code="invalid_image") from None
        else:
            raise ApiError(f"{pw}: unsupported content part type {kind!r} (text, image_url)", pw)
    return parts


# ------------------------------------------------------------------------------------------------ responses


def new_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(cid: str, model: str, completion: Completion) -> dict[str, Any]:
    return {
        "id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": k, "message": {"role": "assistant", "content": s.text}, "finish_reason": s.finish_reason,
                     "logprobs": None} for k, s in enumerate(completion.sequences)],
        "usage": usage(completion.prompt_tokens, completion.completion_tokens),
    }


def chunk(cid: str, model: str, created: int, index: int, delta: dict[str, Any],
          finish_reason: str | None = None) -> dict[str, Any]:
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}


def usage_chunk(cid: str, model: str, created: int, completion: Completion) -> dict[str, Any]:
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
            "usage": usage(completion.prompt_tokens, completion.completion_tokens)}


def models_body(names: Sequence[str], created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": "deem"}
                                       for n in names]}
