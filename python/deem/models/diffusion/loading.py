"""Loading the frozen Stable Diffusion parts: a local diffusers directory (offline, safetensors only) or config
dicts (random initialisation), and the SD text encoder's embedding of the empty prompt (the initial negative
prompt of classifier-free guidance)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from deem.models.diffusion.config import DiffusionConfig


def check_diffusers_dir(path: Path, variant: str | None) -> None:
    hint = "expected a diffusers Stable Diffusion directory with unet/, vae/ and scheduler/ subfolders"
    if not path.is_dir():
        raise FileNotFoundError(f"Stable Diffusion directory {path} does not exist ({hint})")
    stem = "diffusion_pytorch_model" + (f".{variant}" if variant else "")
    for sub in ("unet", "vae"):
        if not (path / sub).is_dir():
            raise FileNotFoundError(f"{path}: missing subfolder {sub}/ ({hint})")
        if not (path / sub / "config.json").is_file():
            raise FileNotFoundError(f"{path}: missing {sub}/config.json ({hint})")
        weights = [path / sub / f"{stem}.safetensors", path / sub / f"{stem}.safetensors.index.json"]
        if not any(w.is_file() for w in weights):
            pickled = list((path / sub).glob("*.bin"))
            extra = (f"; found only pickled weights ({pickled[0].name}), which are not loaded: convert them to "
                     f"safetensors") if pickled else ""
            raise FileNotFoundError(f"{path}: missing {sub}/{stem}.safetensors{extra}")
    if not (path / "scheduler" / "scheduler_config.json").is_file():
        raise FileNotFoundError(f"{path}: missing scheduler/scheduler_config.json ({hint})")


def load_components(config: DiffusionConfig) -> tuple[UNet2DConditionModel, AutoencoderKL, DDPMScheduler]:
    if config.pretrained_path is None:
        unet = UNet2DConditionModel.from_config(config.unet_config)
        vae = AutoencoderKL.from_config(config.vae_config)
        with torch.device("cpu"):  # the schedule is plain data, also under a meta-device construction
            scheduler = DDPMScheduler.from_config(config.scheduler_config)
        return unet, vae.float(), scheduler
    path = Path(config.pretrained_path)
    check_diffusers_dir(path, config.variant)
    common = dict(local_files_only=True, use_safetensors=True, variant=config.variant)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **common)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=torch.float32, **common)
    with torch.device("cpu"):
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True)
    return unet, vae.float(), scheduler


@torch.no_grad()
def negative_prompt_embedding(path: str | Path, prompt: str = "", device: torch.device | str | None = None,
                              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The SD text encoder's `last_hidden_state` for `prompt` (default the empty prompt), padded to
    the tokenizer's max length: the initial value of the learnable negative prompt embedding
    (spec §9.3, §12), [1, 77, 1024] for SD-2.1. Reads `tokenizer/` and `text_encoder/` of a local
    diffusers directory offline; the text encoder is not kept."""
    from transformers import CLIPTextModel, CLIPTokenizer

    path = Path(path)
    for sub, needed in (("tokenizer", "tokenizer_config.json"), ("text_encoder", "config.json"),
                        ("text_encoder", "model.safetensors")):
        if not (path / sub / needed).is_file():
            raise FileNotFoundError(f"{path}: missing {sub}/{needed} (needed for the negative prompt embedding)")
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
    encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", local_files_only=True,
                                            use_safetensors=True).eval()
    ids = tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    if device is not None:
        encoder.to(device)
    out = encoder(ids.to(encoder.device)).last_hidden_state
    return out.to(dtype).detach()

