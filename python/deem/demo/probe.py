"""Linear probes: how much of each scene attribute the image encoder's features carry.

The mechanism DEEM claims is measurable directly: after a contrastive pre-fit on colour-free captions the
encoder's features say little about colour; stage 1 with the diffusion feedback should put it back. The probes
read the two things the LLM reads: the multi-scale maps (the MMFS values; sampled at each shape's centre) and
the visual tokens. Each probe is a ridge-regression classifier fitted on the training scenes and scored on the
test scenes (accuracy, %).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from deem.demo.world import COLOUR_NAMES, KIND_NAMES, WorldScene
from deem.models import DeemModel


@torch.no_grad()
def encoder_features(model: DeemModel, pixels: torch.Tensor, scenes: list[WorldScene], batch: int = 256):
    """Per shape: the finest two multi-scale maps sampled at its centre; per image: the flattened visual tokens."""
    visual = model.visual_tokenizer.eval()
    at_shapes, tokens = [], []
    for start in range(0, len(pixels), batch):
        chunk = pixels[start : start + batch]
        out = visual.image_encoder(chunk)
        tokens.append(visual(chunk).embeds.flatten(1))
        for i, ws in enumerate(scenes[start : start + batch]):
            grid = torch.tensor([[[[s.cx * 2 - 1, s.cy * 2 - 1]] for s in ws.shapes]])  # [1, n, 1, 2]
            feats = [F.grid_sample(m[i : i + 1], grid, align_corners=False)[0, :, :, 0].t() for m in out.multiscale[:2]]
            at_shapes.append(torch.cat(feats, dim=1))
    return torch.cat(at_shapes), torch.cat(tokens)


def _ridge_accuracy(x_train, y_train, x_test, y_test, classes: int, lam: float = 1e-1) -> float:
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    xs, xt = (x_train - mean) / std, (x_test - mean) / std
    xs = torch.cat([xs, torch.ones(len(xs), 1)], 1).double()
    xt = torch.cat([xt, torch.ones(len(xt), 1)], 1).double()
    target = F.one_hot(y_train, classes).double()
    w = torch.linalg.solve(xs.t() @ xs + lam * len(xs) * torch.eye(xs.shape[1], dtype=xs.dtype), xs.t() @ target)
    return 100.0 * float(((xt @ w).argmax(1) == y_test).double().mean())


def probe_attributes(model: DeemModel, train: tuple[torch.Tensor, list[WorldScene]],
                     test: tuple[torch.Tensor, list[WorldScene]]) -> dict[str, float]:
    """Probe accuracies (%): colour and kind of a shape from the maps at its centre, the number of shapes and
    the background from the visual tokens."""
    (px_train, sc_train), (px_test, sc_test) = train, test
    shapes_train, tokens_train = encoder_features(model, px_train, sc_train)
    shapes_test, tokens_test = encoder_features(model, px_test, sc_test)

    def per_shape(scenes, names, attr):
        return torch.tensor([names.index(getattr(s, attr)) for ws in scenes for s in ws.shapes])

    backgrounds = sorted({ws.background for ws in sc_train} | {ws.background for ws in sc_test})
    out = {
        "colour of a shape (maps)": _ridge_accuracy(
            shapes_train, per_shape(sc_train, COLOUR_NAMES, "colour"), shapes_test,
            per_shape(sc_test, COLOUR_NAMES, "colour"), len(COLOUR_NAMES)),
        "kind of a shape (maps)": _ridge_accuracy(
            shapes_train, per_shape(sc_train, KIND_NAMES, "kind"), shapes_test,
            per_shape(sc_test, KIND_NAMES, "kind"), len(KIND_NAMES)),
        "colour of the shape at each position (tokens)": _slot_colour(tokens_train, sc_train, tokens_test, sc_test),
        "kind of the shape at each position (tokens)": _slot_kind(tokens_train, sc_train, tokens_test, sc_test),
        "number of shapes (tokens)": _ridge_accuracy(
            tokens_train, torch.tensor([len(ws.shapes) - 1 for ws in sc_train]), tokens_test,
            torch.tensor([len(ws.shapes) - 1 for ws in sc_test]), 3),
        "background (tokens)": _ridge_accuracy(
            tokens_train, torch.tensor([backgrounds.index(ws.background) for ws in sc_train]), tokens_test,
            torch.tensor([backgrounds.index(ws.background) for ws in sc_test]), len(backgrounds)),
    }
    return out


_SLOTS = ("left", "middle", "right")


def _slot_probe(x_train, sc_train, x_test, sc_test, names, attr) -> float:
    """Per position slot, a probe from the visual tokens of the attribute of the shape there (images with a shape
    in that slot); the accuracy over all slots."""
    def rows(scenes, slot):
        idx, ys = [], []
        for i, ws in enumerate(scenes):
            shape = next((s for s in ws.shapes if s.position == slot), None)
            if shape is not None:
                idx.append(i)
                ys.append(names.index(getattr(shape, attr)))
        return torch.tensor(idx, dtype=torch.long), torch.tensor(ys, dtype=torch.long)

    hits = total = 0.0
    for slot in _SLOTS:
        (i_tr, y_tr), (i_te, y_te) = rows(sc_train, slot), rows(sc_test, slot)
        if len(i_tr) == 0 or len(i_te) == 0:
            continue
        acc = _ridge_accuracy(x_train[i_tr], y_tr, x_test[i_te], y_te, len(names))
        hits += acc * len(i_te)
        total += len(i_te)
    return hits / max(total, 1.0)


def _slot_colour(x_train, sc_train, x_test, sc_test) -> float:
    return _slot_probe(x_train, sc_train, x_test, sc_test, COLOUR_NAMES, "colour")


def _slot_kind(x_train, sc_train, x_test, sc_test) -> float:
    return _slot_probe(x_train, sc_train, x_test, sc_test, KIND_NAMES, "kind")
