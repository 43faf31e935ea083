"""From what users give to engine requests: checkpoint loading, images (paths, bytes, data URIs, file URLs) in the
eval view of the model's resolution, and the project's chat prompt.

Prompt format (the training and evaluation templates of data/prompts.py, multi-turn):

    <system>\\n\\n ## USER: <image run>...<text> \\n ## ASSISTANT: <answer></s> ## USER: ... \\n ## ASSISTANT:

where an image run is `<|startofimage|>` followed by the image tokens; each user turn lists its parts in order.
"""

from __future__ import annotations

import base64
import binascii
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from deem.data.errors import DataError, SampleError
from deem.data.images import DEFAULT_MAX_IMAGE_PIXELS, DualViewTransform, load_image
from deem.data.prompts import SYSTEM
from deem.infer.request import InferenceError, Request, SamplingParams

IMAGE_PLACEHOLDER = "<image>"  # where an image goes in a CLI prompt (its run replaces it)


# ------------------------------------------------------------------------------------------------ checkpoint


def load_checkpoint(path: str | Path, device: str | torch.device | None = None,
                    dtype: torch.dtype | str | None = None):
    """`DeemModel.from_pretrained(path)` on `device` in `dtype` (defaults: the GPU in bf16 if there is one, else
    the CPU in fp32) and its tokenizer from `path/tokenizer` (checked against the model's special tokens)."""
    from deem.data.tokenizer import load_llama_tokenizer
    from deem.models import DeemModel

    path = Path(path)
    if not (path / "config.json").is_file():
        raise InferenceError(f"{path} is not a deem checkpoint (no config.json; `deem train export` or "
                             "DeemModel.save_pretrained writes one)")
    if not (path / "tokenizer").is_dir():
        raise InferenceError(f"{path} has no tokenizer directory ({path / 'tokenizer'}; `deem train export` "
                             "writes it next to the weights)")
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(dtype, str):
        dtype = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
                 "fp32": torch.float32, "float32": torch.float32}.get(dtype, dtype)
        if isinstance(dtype, str):
            raise InferenceError(f"unknown dtype {dtype!r} (bf16, fp16, fp32)")
    dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    model = DeemModel.from_pretrained(str(path), dtype=dtype).to(dev).eval()
    cfg = model.config
    try:
        tok = load_llama_tokenizer(path / "tokenizer", pad_id=cfg.special_tokens["pad"],
                                   num_img_token=cfg.num_img_token)
    except DataError as exc:
        raise InferenceError(f"tokenizer of {path}: {exc}") from exc
    ids = tok.special.as_dict()
    bad = {k: (v, ids[k]) for k, v in cfg.special_tokens.items() if k in ids and ids[k] != v}
    if bad:
        raise InferenceError(f"{path}: the tokenizer and the model disagree on special token ids (model, "
                             f"tokenizer): {bad}")
    return model, tok


# ------------------------------------------------------------------------------------------------ images


class ImagePreparer:
    """Images as the model's eval view: the whole image squashed to `resolution` (no crop, no flip), [3, R, R]
    float in [0, 1]. Bad images raise `InferenceError` naming the image."""

    def __init__(self, resolution: int, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> None:
        self.transform = DualViewTransform(resolution, resolution, center_crop=False, random_flip=False)
        self.max_pixels = max_pixels

    def __call__(self, image: Image.Image | bytes | str | Path, name: str = "image") -> torch.Tensor:
        if not isinstance(image, Image.Image):
            try:
                image = load_image(image if isinstance(image, (bytes, bytearray)) else str(image), "request", name,
                                   self.max_pixels)
            except SampleError as exc:
                raise InferenceError(f"{name}: {exc.reason}") from None
        t = self.transform
        return t.view(image.convert("RGB"), t.sample_params(image.size, None), t.resolution)


def image_url_bytes(url: str, file_roots: Sequence[str | Path] | None = None, name: str = "image_url") -> bytes:
    """The bytes of a `data:image/...;base64,` URI or a `file://` URL. With `file_roots`, a file must lie inside
    one of them. No network: http(s) URLs are refused."""
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or ";base64" not in header:
            raise InferenceError(f"{name}: a data URI must be base64 encoded (data:image/png;base64,...)")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise InferenceError(f"{name}: the data URI is not valid base64") from None
    if url.startswith("file:"):
        parsed = urllib.parse.urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise InferenceError(f"{name}: only local file URLs are served (file:///path), got host {parsed.netloc}")
        path = Path(urllib.request.url2pathname(parsed.path)).resolve()
        if file_roots is not None and not any(path.is_relative_to(Path(r).resolve()) for r in file_roots):
            raise InferenceError(f"{name}: {path} is outside the directories this server reads images from")
        if not path.is_file():
            raise InferenceError(f"{name}: no such file {path}")
        return path.read_bytes()
    scheme = url.split(":", 1)[0] if ":" in url else url[:16]
    raise InferenceError(f"{name}: unsupported image URL scheme {scheme!r} (data: URIs and file:// URLs only; "
                         "this server does not fetch from the network)")


# ------------------------------------------------------------------------------------------------ chat


@dataclass
class Turn:
    """One message: role "user" or "assistant"; `parts` are text strings and images (in order)."""

    role: str
    parts: list = field(default_factory=list)


def render_chat(turns: Sequence[Turn], image_run: str, system: str | None = None) -> tuple[str, list]:
    """The prompt text of a conversation ending with the assistant's turn to speak, and its images in order."""
    pieces = [SYSTEM if system is None else system.rstrip() + "\n\n"]
    images: list = []
    for turn in turns:
        text = ""
        for part in turn.parts:
            if isinstance(part, str):
                text += part
            else:
                if turn.role != "user":
                    raise InferenceError("images can only be part of user messages")
                text += image_run
                images.append(part)
        if turn.role == "user":
            pieces.append("## USER: " + text + " \n")
        elif turn.role == "assistant":
            pieces.append("## ASSISTANT: " + text.strip() + "</s>")
        else:
            raise InferenceError(f"unknown role {turn.role!r} (system, user, assistant)")
    if not turns or turns[-1].role != "user":
        raise InferenceError("the conversation must end with a user message")
    pieces.append("## ASSISTANT:")
    return " ".join(pieces).strip(), images


def user_parts(text: str, images: Sequence) -> list:
    """A user turn from a prompt and images: each `<image>` placeholder takes the next image; without
    placeholders the images come first."""
    count = text.count(IMAGE_PLACEHOLDER)
    if count == 0:
        return [*images, text]
    if count != len(images):
        raise InferenceError(f"the prompt has {count} {IMAGE_PLACEHOLDER} placeholders for {len(images)} images")
    parts: list = []
    for k, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if piece:
            parts.append(piece)
        if k < len(images):
            parts.append(images[k])
    return parts


def chat_request(tokenizer, turns: Sequence[Turn], params: SamplingParams | None = None,
                 system: str | None = None) -> Request:
    """A `Request` for a conversation whose image parts are prepared tensors ([3, R, R])."""
    text, images = render_chat(turns, tokenizer.image_run, system)
    return Request(tokenizer.encode(text), list(images), params or SamplingParams())
