"""Test-time adaptation of `DeemModel`'s visual tokenizer by diffusion feedback (spec/model.md §10.3): a few
optimiser steps on the feedback loss of the test images, then every weight restored."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class AdaptationMethods:
    """`test_time_adaptation` of `DeemModel` (which provides `visual_tokenizer` and `diffusion`)."""

    @contextlib.contextmanager
    def test_time_adaptation(
        self,
        image_tensors: torch.Tensor,
        image_tensors_dec: torch.Tensor,
        image_tensors_mask: torch.Tensor | None = None,
        steps: int = 5,
        samples: int = 5,
        lr: float = 4e-6,
        generator: torch.Generator | None = None,
    ) -> Iterator[list[float]]:
        """Adapt the visual tokenizer to the test images by diffusion feedback, then restore it exactly
        (spec/model.md §10.3, the intended procedure): `steps` AdamW steps on the feedback loss with `samples`
        timesteps per image spread over the schedule (s, s + 1000/samples, ...). Yields the losses;
        every weight, requires_grad flag and train/eval mode is restored on exit."""
        if self.diffusion is None:
            raise ValueError("test-time adaptation needs the diffusion model")
        tok = self.visual_tokenizer
        params = [p for p in tok.parameters() if p.is_floating_point()]
        snapshot = [p.detach().clone() for p in params]
        flags = [p.requires_grad for p in params]
        buffers = {n: b.detach().clone() for n, b in tok.named_buffers()}
        was_training = tok.training
        losses: list[float] = []
        try:
            for p in params:
                p.requires_grad_(True)
            tok.train()
            optimizer = torch.optim.AdamW([{"params": [p]} for p in params], lr=lr)
            n = image_tensors.shape[0]
            stride = self.diffusion.num_train_timesteps // samples
            images = image_tensors.repeat_interleave(samples, 0)
            images_dec = image_tensors_dec.repeat_interleave(samples, 0)
            masks = None if image_tensors_mask is None else image_tensors_mask.repeat_interleave(samples, 0)
            with torch.enable_grad():
                for _ in range(steps):
                    start = int(torch.randint(0, stride, (1,), generator=generator))
                    t = (start + stride * torch.arange(samples)).repeat(n).to(images.device)
                    loss = tok.feedback_loss(tok.encode(images, masks), images_dec, self.diffusion, t, generator)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    losses.append(float(loss.detach()))
            yield losses
        finally:
            with torch.no_grad():
                for p, saved, flag in zip(params, snapshot, flags):
                    p.copy_(saved)
                    p.grad = None
                    p.requires_grad_(flag)
                for name, b in tok.named_buffers():
                    b.copy_(buffers[name])
            tok.train(was_training)
