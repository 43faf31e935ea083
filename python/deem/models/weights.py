"""One strict weight loader for every checkpoint this project reads (DESIGN.md: strict loading that reports
missing and unexpected keys).

A foreign format first goes through a pure key-remapping function, the way timm's `checkpoint_filter_fn` works:
the original DEEM / MM-Interleaved maps and the HF LLaMA map in :mod:`deem.models.loading`, open_clip's ConvNeXt
map in :mod:`deem.models.vision`. Each returns a :class:`Remapped` (the tensors under our names, the checkpoint
name each came from, and the checkpoint keys deliberately not loaded). :func:`load_weights` then copies the
tensors into a module after checking every key, and returns a :class:`LoadReport`. Our own formats (stage
chaining, resuming, frozen initial weights) call :func:`load_weights` directly.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

import torch
from torch import nn

from deem.errors import UserError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SHOWN = 8  # keys quoted per problem in an error message


class CheckpointError(UserError, ValueError):
    """A checkpoint that does not fit the model: names the file and the offending keys."""


@dataclass
class LoadReport:
    """What :func:`load_weights` did.

    Attributes:
        source: the file (or description) the weights came from.
        loaded: module keys copied from the checkpoint.
        missing: module keys the checkpoint lacks (left as they were).
        unexpected: remapped checkpoint keys the module does not have (not loaded; only without `strict`).
        ignored: checkpoint keys deliberately not loaded (by the format's key map or a `drop` prefix).
        kind: what the checkpoint was recognised as, for foreign formats.
        notes: why keys were ignored or consumed, one line per reason.
    """

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    kind: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every module key was loaded and no checkpoint key was left unexpected."""
        return not self.missing and not self.unexpected

    def summary(self) -> str:
        kind = f" ({self.kind})" if self.kind else ""
        return (
            f"{self.source}{kind}: {len(self.loaded)} tensors loaded, {len(self.missing)} missing, "
            f"{len(self.unexpected)} unexpected, {len(self.ignored)} ignored"
        )


@dataclass
class Remapped:
    """A checkpoint rewritten under the target module's key names by a format's key-remapping function.

    Attributes:
        state: tensors under the module's names.
        origin: module key -> the checkpoint key it came from (where they differ), for error messages.
        ignored: checkpoint keys deliberately not carried over.
        notes: why (one line per reason).
        kind: what the checkpoint was recognised as.
    """

    state: dict[str, torch.Tensor] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    kind: str = ""


# ------------------------------------------------------------------------------------------------ reading


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return obj


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint file or of a directory holding one (sharded checkpoints included).
    `.bin` files are read with `torch.load(weights_only=True)`: nothing is unpickled beyond tensors."""
    path = Path(path)
    if path.is_file():
        return _read_file(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such file or directory")
    for index_name in INDEX_FILES:
        index = path / index_name
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(_read_file(path / shard))
            return state
    for name in WEIGHT_FILES:
        if (path / name).exists():
            return _read_file(path / name)
    raise CheckpointError(f"{path}: no weights found (expected one of {WEIGHT_FILES + INDEX_FILES})")


# ------------------------------------------------------------------------------------------------ loading


def matches(key: str, prefixes: Sequence[str]) -> bool:
    """Whether `key` starts with one of `prefixes`; a `*` in a prefix matches any run of characters."""
    return any(fnmatchcase(key, p + "*") if "*" in p else key.startswith(p) for p in prefixes)


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    # a parameter partitioned by DeepSpeed ZeRO-3 is an empty placeholder that keeps its real shape in ds_shape
    return tuple(getattr(t, "ds_shape", t.shape))


def _quote(keys: Sequence[str], origin: Mapping[str, str]) -> str:
    shown = [origin.get(k, k) for k in keys[:SHOWN]]
    return f"{shown}{' ...' if len(keys) > SHOWN else ''}"


def load_weights(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    source: str = "<state dict>",
    strict: bool = True,
    allow_missing: bool | Sequence[str] = (),
    drop: Sequence[str] = (),
    params_only: bool = False,
    check_only: bool = False,
    origin: Mapping[str, str] | None = None,
    hints: Mapping[str, str] | None = None,
) -> LoadReport:
    """Copy `state` (keys relative to `module`) into `module` after checking every key.

    Args:
        strict: module keys the checkpoint lacks and checkpoint keys the module does not have are errors
            (except those `allow_missing` / `drop` name); without it they are only reported.
        allow_missing: prefixes of module keys that may stay as they are (True: every key).
        drop: prefixes of checkpoint keys to discard (reported as `ignored`).
        params_only: the targets are the module's parameters (a checkpoint of trained weights); buffers are
            then neither expected nor loadable.
        check_only: check, copy nothing (e.g. when DeepSpeed restores the weights itself).
        origin: module key -> checkpoint key, so that messages name the keys as the checkpoint spells them.
        hints: extra advice appended to the "unexpected", "missing" and "shape" parts of the error.

    A shape mismatch or a value that is not a tensor is always an error. On error nothing is copied; the
    `CheckpointError` names `source` and every kind of problem found. Values are cast to the target's dtype
    and device; a module built on the meta device gets the tensors assigned.
    """
    origin = origin or {}
    hints = hints or {}
    own = dict(module.named_parameters()) if params_only else module.state_dict()
    ignored = sorted(k for k in state if matches(k, drop))
    kept = {k: v for k, v in state.items() if not matches(k, drop)}
    not_tensors = [k for k, v in kept.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"{source}: {_quote(not_tensors, origin)} hold no tensor")
    unexpected = sorted(k for k in kept if k not in own)
    missing = sorted(k for k in own if k not in kept)
    required = [] if allow_missing is True else [k for k in missing if not matches(k, allow_missing or ())]
    mismatched = sorted(k for k, v in kept.items() if k in own and tuple(v.shape) != _shape(own[k]))
    problems = []
    if strict and unexpected:
        what = "are not parameters of the model" if params_only else "the model does not have"
        problems.append(f"{len(unexpected)} checkpoint keys {what}: {_quote(unexpected, origin)}"
                        + (f" ({hints['unexpected']})" if "unexpected" in hints else ""))
    if strict and required:
        problems.append(f"{len(required)} model keys are not in the checkpoint: {_quote(required, {})}"
                        + (f" ({hints['missing']})" if "missing" in hints else ""))
    if mismatched:
        shown = "; ".join(f"{origin.get(k, k)}: checkpoint {tuple(kept[k].shape)} vs model {_shape(own[k])}"
                          for k in mismatched[:SHOWN]) + (" ..." if len(mismatched) > SHOWN else "")
        problems.append(f"shape mismatch for {len(mismatched)} tensors: {shown}"
                        + (f" ({hints['shape']})" if "shape" in hints else ""))
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))
    to_load = {k: v for k, v in kept.items() if k in own}
    if not check_only:
        _copy(module, own, to_load)
    return LoadReport(source=source, loaded=sorted(to_load), missing=missing, unexpected=unexpected,
                      ignored=ignored)


def _copy(module: nn.Module, own: Mapping[str, torch.Tensor], values: Mapping[str, torch.Tensor]) -> None:
    if any(own[k].is_meta for k in values):
        # assign=True keeps the checkpoint's dtype: match the module's so a meta build behaves alike
        module.load_state_dict({k: v.to(own[k].dtype) for k, v in values.items()}, strict=False, assign=True)
        return
    with torch.no_grad():
        for k, v in values.items():
            own[k].copy_(v)
