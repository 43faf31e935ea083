"""Optimiser parameter groups (spec/data-eval.md §2.3) and the warmup + cosine schedule."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from deem.errors import ConfigError

NORM_TYPES: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GroupNorm)


def _is_norm(module: nn.Module) -> bool:
    # LayerNorm/GroupNorm, and every RMSNorm-like class (LlamaRMSNorm, timm LayerNorm2d ...)
    return isinstance(module, NORM_TYPES) or "Norm" in type(module).__name__


def no_decay_names(model: nn.Module) -> set[str]:
    """Biases and the weights of normalisation layers: no weight decay. (The original decays the LLaMA
    RMSNorm weights because its RMSNorm class was not recognised as a norm; deem treats every norm alike.)"""
    names = set()
    for mod_name, module in model.named_modules():
        for p_name, _ in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if p_name == "bias" or _is_norm(module):
                names.add(full)
    return names


def param_groups(
    model: nn.Module, base_lr: float, weight_decay: float, groups: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Trainable parameters into groups: the first `pattern` (substring of the name) that matches gives the
    lr and weight decay; unmatched parameters get the base values; biases and norm weights get no decay."""
    no_decay = no_decay_names(model)
    buckets: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        idx = next((i for i, g in enumerate(groups) if g["pattern"] in name), -1)
        spec = groups[idx] if idx >= 0 else {}
        lr = float(spec.get("lr", base_lr) if spec.get("lr") is not None else base_lr)
        wd = float(spec["weight_decay"]) if spec.get("weight_decay") is not None else weight_decay
        decayed = name not in no_decay and wd > 0
        key = (idx, decayed)
        if key not in buckets:
            buckets[key] = {
                "params": [],
                "names": [],
                "lr": lr,
                "weight_decay": wd if decayed else 0.0,
                "group": spec.get("pattern", "default"),
            }
        buckets[key]["params"].append(param)
        buckets[key]["names"].append(name)
    return [buckets[k] for k in sorted(buckets)]


def warmup_cosine(step: int, warmup_steps: int, max_steps: int) -> float:
    """Linear warmup from 0 to 1, then cosine decay to 0 at max_steps (HF's cosine schedule)."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def build_optimizer(model: nn.Module, cfg) -> tuple[torch.optim.Optimizer, list[dict[str, Any]]]:
    groups = param_groups(model, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.groups)
    if not groups:
        raise ConfigError("no trainable parameters: check the stage's freezing flags")
    optimizer = torch.optim.AdamW(
        [{k: v for k, v in g.items() if k != "names"} for g in groups],
        lr=cfg.optim.lr,
        betas=tuple(cfg.optim.betas),
        eps=cfg.optim.eps,
    )
    return optimizer, groups
