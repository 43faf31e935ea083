"""Stand-ins for the components DEEM takes pretrained, fitted on the synthetic world in seconds.

* `prefit_vae`: Stable Diffusion's VAE (an AutoencoderKL fitted to reconstruct the world's images; frozen
  afterwards, its latents scaled to unit variance as SD's `scaling_factor` does);
* `prefit_unet`: Stable Diffusion's UNet, a text-to-image model conditioned on `CaptionEncoder` (the stand-in
  for SD's CLIP text encoder, discarded afterwards except for the empty-caption embedding that starts the
  image decoder's negative prompt), trained with 10 % dropped captions for classifier-free guidance;
* `prefit_encoder`: the CLIP image encoder (ConvNeXt trunk, adapters, Q-Former and the projection into the LLM),
  fitted to what captions that leave the shapes' colours out say, with random hue rotations of the images.
  Like CLIP, it keeps what its captions name and becomes invariant to what they do not: the bias the
  diffusion feedback of DEEM's stage 1 is meant to correct.

All three draw every random number from one `torch.Generator` (the same seed gives the same weights).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from deem.models import DeemModel

OnStep = Callable[[float], None] | None


@dataclass
class FitLog:
    """Per-step losses of one pre-fit (for the report's curves)."""

    name: str
    losses: list[float]
    seconds: float = 0.0

    @property
    def final(self) -> float:
        tail = self.losses[-20:]
        return sum(tail) / max(1, len(tail))


class CaptionEncoder(nn.Module):
    """Token embeddings, learned positions and one transformer layer: the stand-in for a CLIP text encoder
    ([B, L] ids -> [B, L, dim]; `pooled` gives one vector per caption)."""

    def __init__(self, vocab_size: int, dim: int, max_len: int = 64, pad_id: int = 0) -> None:
        super().__init__()
        self.pad_id = pad_id
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        self.layer = nn.TransformerEncoderLayer(dim, nhead=2, dim_feedforward=2 * dim, dropout=0.0,
                                                batch_first=True, norm_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pad = ids == self.pad_id
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        return self.norm(self.layer(x, src_key_padding_mask=pad))

    def pooled(self, ids: torch.Tensor) -> torch.Tensor:
        keep = (ids != self.pad_id).unsqueeze(-1).float()
        return (self(ids) * keep).sum(1) / keep.sum(1).clamp_min(1.0)


def pad_ids(seqs: list[list[int]], pad_id: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def hue_rotate(images: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of [B, 3, H, W] images in [0, 1] by `angles` (radians, [B]) about the grey axis: greys,
    black and white stay, every chromatic colour turns by the same angle."""
    cos, sin = torch.cos(angles), torch.sin(angles)
    third, root = 1.0 / 3.0, math.sqrt(1.0 / 3.0)
    a = cos + (1 - cos) * third
    b = third * (1 - cos) - root * sin
    c = third * (1 - cos) + root * sin
    rot = torch.stack([torch.stack([a, b, c], -1), torch.stack([c, a, b], -1), torch.stack([b, c, a], -1)], -2)
    return torch.einsum("bij,bjhw->bihw", rot, images).clamp(0, 1)


def _batches(n: int, batch: int, steps: int, generator: torch.Generator):
    for _ in range(steps):
        yield torch.randint(0, n, (min(batch, n),), generator=generator)


def _optimizer(params, lr: float, steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with the training recipe's schedule: 5 % linear warm-up, then cosine decay to 0."""
    from deem.train.optim import warmup_cosine

    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s + 1, warmup, steps + 1))


def _step(loss: torch.Tensor, opt: torch.optim.Optimizer, schedule: torch.optim.lr_scheduler.LambdaLR,
          losses: list[float], on_step: OnStep, clip: list[nn.Parameter] | None = None) -> None:
    """One optimizer step of a pre-fit (gradient norm clipped to 1 over `clip` if given); records the loss."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(clip, 1.0)
    opt.step()
    schedule.step()
    losses.append(float(loss.detach()))
    if on_step is not None:
        on_step(losses[-1])


def prefit_vae(model: DeemModel, images_dec: torch.Tensor, steps: int, generator: torch.Generator,
               batch: int = 32, lr: float = 2e-3, kl_weight: float = 1e-6, on_step: OnStep = None) -> FitLog:
    """Fit the model's VAE to reconstruct `images_dec` [N, 3, s, s] in [0, 1], then set its scaling factor to
    1 / std of the latents (SD's convention) in the module and the model config."""
    vae = model.diffusion.vae
    vae.requires_grad_(True)
    vae.train()
    opt, schedule = _optimizer(list(vae.parameters()), lr, steps)
    x_all = images_dec * 2 - 1
    losses = []
    for idx in _batches(len(x_all), batch, steps, generator):
        x = x_all[idx]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        loss = F.mse_loss(vae.decode(z).sample, x) + kl_weight * posterior.kl().mean()
        _step(loss, opt, schedule, losses, on_step)
    vae.requires_grad_(False)
    vae.eval()
    with torch.no_grad():
        means = [vae.encode(x_all[i : i + 256]).latent_dist.mean for i in range(0, len(x_all), 256)]
        std = float(torch.cat(means).std())
    scale = 1.0 / max(std, 1e-6)
    vae.register_to_config(scaling_factor=scale)
    model.config.diffusion["vae_config"] = {**model.config.diffusion["vae_config"], "scaling_factor": scale}
    return FitLog("VAE (reconstruction MSE)", losses)


@torch.no_grad()
def _latent_moments(model: DeemModel, images_dec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    vae = model.diffusion.vae
    scale = vae.config.scaling_factor
    means, stds = [], []
    for i in range(0, len(images_dec), 256):
        post = vae.encode(images_dec[i : i + 256] * 2 - 1).latent_dist
        means.append(post.mean * scale)
        stds.append(post.std * scale)
    return torch.cat(means), torch.cat(stds)


def prefit_unet(model: DeemModel, images_dec: torch.Tensor, caption_ids: list[list[int]], empty_ids: list[int],
                pad_id: int, steps: int, generator: torch.Generator, batch: int = 64, lr: float = 2e-3,
                uncond_prob: float = 0.1, text: CaptionEncoder | None = None,
                on_step: OnStep = None) -> tuple[FitLog, CaptionEncoder]:
    """Fit the UNet as a caption-to-image diffusion model (epsilon prediction on the frozen VAE's latents)
    conditioned on a jointly trained `CaptionEncoder`; captions are replaced by the empty caption with
    probability `uncond_prob`. Returns the log and the caption encoder."""
    diffusion = model.diffusion
    unet = diffusion.unet
    dim = unet.config.cross_attention_dim
    vocab = max(max(s) for s in caption_ids) + 1
    if text is None:
        text = CaptionEncoder(max(vocab, max(empty_ids) + 1), dim, max_len=64, pad_id=pad_id)
    text.train()
    ids_all = pad_ids(caption_ids, pad_id)
    empty = pad_ids([empty_ids], pad_id)[0]
    mean, std = _latent_moments(model, images_dec)
    unet.requires_grad_(True)
    unet.train()
    params = [*unet.parameters(), *text.parameters()]
    opt, schedule = _optimizer(params, lr, steps)
    T = diffusion.num_train_timesteps
    losses = []
    for idx in _batches(len(mean), batch, steps, generator):
        z0 = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=generator)
        noise = torch.randn(z0.shape, generator=generator)
        t = torch.randint(0, T, (len(idx),), generator=generator)
        noisy = diffusion.scheduler.add_noise(z0, noise, t)
        ids = ids_all[idx].clone()
        drop = torch.rand(len(idx), generator=generator) < uncond_prob
        ids[drop] = pad_id
        ids[drop, : len(empty)] = empty[: ids.shape[1]]
        pred = unet(noisy, t, text(ids)).sample
        loss = F.mse_loss(pred, noise)
        _step(loss, opt, schedule, losses, on_step, clip=params)
    unet.eval()
    text.eval()
    return FitLog("UNet (text-to-image, noise MSE)", losses), text


SLOTS = ("left", "middle", "right")


def caption_targets(scenes, colours: bool) -> tuple[torch.Tensor, list[int]]:
    """What a caption says about each scene, as classification targets: per position slot (left / middle / right)
    the shape's kind, size and (with `colours`) colour, or "nothing there", and the background. Returns
    [N, n_targets] class indices and the number of classes of each target."""
    from deem.data.synth import BACKGROUNDS, COLOURS, SHAPES

    rows = []
    for ws in scenes:
        by_slot = {s.position: s for s in ws.shapes}
        row = []
        for slot in SLOTS:
            shape = by_slot.get(slot)
            row += [0 if shape is None else 1 + SHAPES.index(shape.kind),
                    0 if shape is None else 1 + ("small", "large").index(shape.size)]
            if colours:
                row.append(0 if shape is None else 1 + list(COLOURS).index(shape.colour))
        rows.append([*row, BACKGROUNDS.index(ws.background)])
    sizes = [1 + len(SHAPES), 3, *([1 + len(COLOURS)] if colours else [])] * len(SLOTS) + [len(BACKGROUNDS)]
    return torch.tensor(rows), sizes


def prefit_encoder(model: DeemModel, images: torch.Tensor, targets: torch.Tensor, sizes: list[int], steps: int,
                   generator: torch.Generator, batch: int = 128, lr: float = 3e-3, hue: bool = True,
                   on_step: OnStep = None) -> FitLog:
    """The stand-ins for CLIP and the BLIP-2 Q-Former, in that order: first the image encoder (ConvNeXt trunk and
    adapters) learns to predict from its tokens what the images' captions say (`caption_targets`), then, with
    the trunk frozen, the Q-Former and its projection into the LLM learn to carry the same from the tokens they
    produce; each through a linear head discarded afterwards. Half of `steps` each. (Caption supervision stands
    in for CLIP's contrastive pre-training: a contrastive fit of this tiny encoder needs many times the CPU
    budget for equally readable tokens.) With `hue`, every image gets a random hue rotation: the encoder learns
    to ignore what the captions do not name."""
    visual = model.visual_tokenizer
    bounds = [0, *torch.tensor(sizes).cumsum(0).tolist()]
    losses: list[float] = []

    def fit(features, width: int, params: list[nn.Parameter], n_steps: int) -> None:
        head = nn.Linear(width, sum(sizes))
        opt, schedule = _optimizer([*params, *head.parameters()], lr, n_steps)
        for idx in _batches(len(images), batch, n_steps, generator):
            x = images[idx]
            if hue:
                x = hue_rotate(x, torch.rand(len(idx), generator=generator) * (2 * math.pi))
            logits = head(features(x))
            loss = sum(F.cross_entropy(logits[:, bounds[k] : bounds[k + 1]], targets[idx, k])
                       for k in range(len(sizes)))
            _step(loss, opt, schedule, losses, on_step)

    visual.train()
    visual.requires_grad_(False)
    image_encoder = visual.image_encoder
    image_encoder.requires_grad_(True)
    with torch.no_grad():
        n_trunk_tokens = image_encoder(images[:1]).tokens.numel()
    fit(lambda x: image_encoder(x).tokens.flatten(1), n_trunk_tokens, list(image_encoder.parameters()), steps // 2)
    image_encoder.requires_grad_(False)
    head_params = [p for n, p in visual.named_parameters() if not n.startswith("image_encoder.")]
    for p in head_params:
        p.requires_grad_(True)
    width = model.config.num_img_token * visual.proj_t.out_features
    fit(lambda x: visual(x).embeds.flatten(1), width, head_params, steps - steps // 2)
    visual.requires_grad_(True)
    visual.eval()
    return FitLog("image encoder, then Q-Former (caption words, colours left out)", losses)
