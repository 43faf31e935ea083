"""Fuzz the op edge (`deem.ops.ms_deform_attn`, `deem.ops.mmfs_core`) with malformed and edge-case calls.

Each case is a JSON dict drawn by `draw_case` from primitive choices, so the same generator serves hypothesis
(tests/ops/test_fuzz.py) and a seeded random stream (this script). Cases run in child processes, many per
child; the child appends one result line per case to a file before it starts the next, so a child killed by
a signal (or hung) is attributed to the first case without a result, and a fresh child resumes after it.

Outcomes:
  correct        valid call; output and gradients match the float64 reference
  clean_error    invalid call refused with ValueError / TypeError / MemoryError
  garbage        an output that differs from the reference, or an invalid call that returned anything
  unclean_error  another exception type, or a valid call refused
  crash / hang   the child died from a signal / stopped answering
  skipped        the case could not be built here (or needs an API this deem lacks)
  harness_error  this driver failed on the case (its own bug)

    python tests/ops/fuzz_driver.py --cases 3000 --seed 0
    PYTHONPATH=/path/to/other/site python tests/ops/fuzz_driver.py ...   # fuzz another build
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

T = TypeVar("T")
INT32_MAX = 2**31 - 1
FLOAT_DTYPES = ["float64", "float32", "float16", "bfloat16"]
INDEX_NAMES = ("spatial_shapes", "level_start_index")
DIFFERENTIABLE = ("value", "sampling_locations", "attention_weights", "attention_logits", "ignore_token")
MSDA_ARGS = ["value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_weights"]
MMFS_ARGS = ["value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_logits",
             "image_visible", "ignore_token"]
BAD_OUTCOMES = ("garbage", "unclean_error", "crash", "hang", "harness_error")

# Level tables at and beyond what the kernels index in int32; 274177 * 67280421310721 = 2^64 + 1 wraps to 1.
HUGE_LEVELS = [
    [[46340, 46340]], [[46341, 46341]], [[INT32_MAX, 1]], [[2**31, 1]], [[1, 2**31 - 2], [1, 1]],
    [[1, INT32_MAX], [1, 1]], [[2**32 + 1, 1]], [[2**32 + 1, 2**32 - 1], [2, 1]], [[274177, 67280421310721]],
    [[274177, 67280421310721], [2, 2]], [[2**31 + 2, 2**31 + 2]], [[65536, 32768]], [[3, 3], [2**33, 2**30]],
]
HUGE_DIMS = [INT32_MAX, 2**31, 2**32 + 1]


# ------------------------------------------------------------------------------------------- generation

class Choices(Protocol):
    def integer(self, lo: int, hi: int) -> int: ...
    def choice(self, options: Sequence[T]) -> T: ...
    def chance(self, percent: int) -> bool: ...


class RandomChoices:
    """Choices from a seeded `random.Random` (the standalone driver)."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def integer(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def choice(self, options: Sequence[T]) -> T:
        return options[self.rng.randrange(len(options))]

    def chance(self, percent: int) -> bool:
        return self.rng.randrange(100) < percent


def wrap64(v: int) -> int:
    """`v` as a two's-complement int64 (what unchecked C++ arithmetic produces)."""
    v &= 2**64 - 1
    return v - 2**64 if v >= 2**63 else v


def prefix_starts(levels: list[list[int]]) -> list[int]:
    starts, total = [], 0
    for h, w in levels:
        starts.append(wrap64(total))
        total = wrap64(total + wrap64(h * w))
    return starts


def draw_case(c: Choices) -> dict[str, Any]:
    """One fuzz case: an op, sizes, dtypes and a list of mutations (see `build_args`)."""
    op = c.choice(["msda", "mmfs"])
    case: dict[str, Any] = dict(op=op, dtype=c.choice(FLOAT_DTYPES), seed=c.integer(0, 2**31 - 1),
                                backward=c.chance(65), check_finite=False, mutations=[])
    case["N"] = 0 if c.chance(8) else c.integer(1, 3)
    case["Lq"] = 0 if c.chance(8) else c.integer(1, 7)
    case["M"] = c.integer(1, 4)
    case["D"] = c.choice([1, 2, 3, 4, 5, 8, 16, 32])
    case["P"] = c.integer(1, 16) if c.chance(20) else c.integer(1, 4)
    case["I"] = c.integer(1, 3)
    case["ignore"] = op == "mmfs" and c.chance(70)
    case["levels"] = [[c.integer(1, 7), c.integer(1, 7)] for _ in range(c.integer(1, 4))]
    family = c.choice(["valid", "valid", "mutated", "mutated", "mutated", "mutated", "structure", "huge"])
    if family == "mutated":
        for _ in range(c.integer(1, 2)):
            case["mutations"].append(draw_mutation(c, case))
    elif family == "structure":
        what = c.choice(["P", "M", "D", "L", "level_zero", "I", "many_levels"])
        if what == "P":
            case["P"] = c.choice([0, 17])
        elif what in ("M", "D"):
            case[what] = 0
        elif what == "L":
            case["levels"] = []
        elif what == "level_zero":
            case["levels"][c.integer(0, len(case["levels"]) - 1)][c.integer(0, 1)] = 0
        elif what == "I":
            case["I"] = 0 if op == "mmfs" else case["I"]
        else:
            case["levels"] = [[1, 1]] * c.choice([256, 257])
            case["Lq"], case["P"] = min(case["Lq"], 2), 1
    elif family == "huge":
        case["N"] = c.choice([0, 0, 1])
        which = c.choice(["levels", "levels", "levels", "Lq", "M", "D", "I"])
        if which == "levels":
            case["levels"] = [list(x) for x in c.choice(HUGE_LEVELS)]
            rows = wrap64(sum(wrap64(h * w) for h, w in case["levels"]))
            if not 0 < rows <= 64:  # only tiny wrapped tables get real data
                case["N"] = 0
        else:
            case["N"] = 0
            case[which] = c.choice(HUGE_DIMS)
            case["ignore"] = case["ignore"] and which not in ("M", "D")
    if c.chance(10):
        case["mutations"].append(["nonfinite", c.choice(["nan", "inf", "-inf"]), c.integer(1, 4)])
        case["check_finite"] = c.chance(50)
    return case


def draw_mutation(c: Choices, case: dict[str, Any]) -> list:
    names = MSDA_ARGS if case["op"] == "msda" else MMFS_ARGS
    kind = c.choice(["non_tensor", "meta", "all_meta", "layout", "layout", "dtype", "dtype", "shape", "starts",
                     "ignore_shape", "index_dtype"])
    if kind == "non_tensor":
        return ["non_tensor", c.choice(names), c.choice(["none", "int", "float", "list", "str", "ndarray"])]
    if kind == "meta":
        return ["meta", c.choice(names)]
    if kind == "all_meta":
        return ["all_meta"]
    if kind == "layout":
        return ["layout", c.choice(names), c.choice(["transpose", "step", "offset"])]
    if kind == "dtype":
        return ["dtype", c.choice([n for n in names if n not in ("spatial_shapes", "level_start_index")]),
                c.choice([*FLOAT_DTYPES, "int32", "int64", "bool"])]
    if kind == "index_dtype":
        return ["dtype", c.choice(["spatial_shapes", "level_start_index"]),
                c.choice(["int32", "int64", "int16", "float32", "bool"])]
    if kind == "shape":
        name, how, dim = c.choice(names), c.choice(["drop", "extra", "grow"]), c.integer(0, 5)
        if name == "value" and how == "grow" and dim == 3:
            dim = 2  # a wider head alone is a consistent (valid) problem
        return ["shape", name, how, dim]
    if kind == "starts":
        return ["starts", c.integer(0, 3)]
    if case["op"] == "mmfs":
        return ["ignore_shape", c.choice(["DM", "flat", "param", "M+1"])]
    return ["dtype", "value", c.choice(["int32", "int64"])]


# ------------------------------------------------------------------------------------------ child side

def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def structural_errors(case: dict[str, Any]) -> list[str]:
    """Why the sizes of a case (before mutations) make it an invalid call."""
    why = []
    levels = case["levels"]
    if not 1 <= case["P"] <= 16:
        why.append("P outside 1..16")
    if case["M"] < 1 or case["D"] < 1:
        why.append("M or D < 1")
    if not 1 <= len(levels) <= 256:
        why.append("L outside 1..256")
    if case["op"] == "mmfs" and case["I"] < 1:
        why.append("no image")
    if any(h < 1 or w < 1 for h, w in levels):
        why.append("empty level")
    if any(h > INT32_MAX or w > INT32_MAX or h * w > INT32_MAX for h, w in levels):
        why.append("level beyond int32")
    if sum(h * w for h, w in levels) > INT32_MAX:
        why.append("levels beyond int32 rows")
    dims = [case["N"], case["Lq"], case["M"], case["D"]] + ([case["I"]] if case["op"] == "mmfs" else [])
    if any(d > INT32_MAX for d in dims):
        why.append("dimension beyond int32")
    return why


def base_tensors(case: dict[str, Any]) -> dict[str, Any]:
    """The well-formed float64 arguments of a case (before mutations)."""
    import torch

    g = torch.Generator().manual_seed(case["seed"])
    N, Lq, M, D, P, n_img = (case[k] for k in ("N", "Lq", "M", "D", "P", "I"))
    levels = case["levels"]
    L = len(levels)
    rows = wrap64(sum(wrap64(h * w) for h, w in levels))
    rows = rows if rows >= 0 else 1
    if case["op"] == "mmfs":
        rows = wrap64(rows * n_img)

    def rand(*shape, scale=1.0, shift=0.0, normal=True):
        numel = 1
        for s in shape:
            numel *= s
        if numel == 0:
            return torch.empty(shape, dtype=torch.float64)
        if numel > 4_000_000:
            raise MemoryError("case too large to build")
        t = torch.randn(shape, generator=g, dtype=torch.float64) if normal else torch.rand(
            shape, generator=g, dtype=torch.float64)
        return t * scale + shift

    spatial = torch.tensor(levels, dtype=torch.int64).reshape(L, 2)
    starts = torch.tensor(prefix_starts(levels), dtype=torch.int64)
    t = dict(value=rand(N, rows, M, D), spatial_shapes=spatial, level_start_index=starts)
    if case["op"] == "msda":
        t["sampling_locations"] = rand(N, Lq, M, L, P, 2, scale=1.4, shift=-0.2, normal=False)
        t["attention_weights"] = rand(N, Lq, M, L, P, normal=False)
    else:
        t["sampling_locations"] = rand(N, Lq, n_img, M, P, 2, scale=1.4, shift=-0.2, normal=False)
        t["attention_logits"] = rand(N, Lq, n_img, M, L, P, scale=2.0)
        t["image_visible"] = rand(N, Lq, n_img, normal=False) < 0.6
        t["ignore_token"] = rand(M, D) if case["ignore"] else None
    return t


def _non_contiguous(t, kind: str):
    import torch

    if kind == "offset":
        buf = torch.empty(t.numel() + 3, dtype=t.dtype)
        out = buf[3:].view(t.shape)
        out.copy_(t)
        return out
    if kind == "transpose" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    buf = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype) if t.dim() else torch.empty(2, dtype=t.dtype)
    out = buf[..., ::2] if t.dim() else buf[0]
    out.copy_(t)
    return out


def build_args(case: dict[str, Any]) -> tuple[dict[str, Any], list[str], dict[str, Any]]:
    """(arguments as the op receives them, reasons why the call is invalid, the float64 reference inputs)."""
    import numpy as np
    import torch

    why = structural_errors(case)
    t = base_tensors(case)
    vdt = _torch_dtype(case["dtype"])
    op_dt = torch.float64 if vdt == torch.float64 else torch.float32
    t["value"] = t["value"].to(vdt)
    t["sampling_locations"] = t["sampling_locations"].to(op_dt)
    if case["op"] == "msda":
        t["attention_weights"] = t["attention_weights"].to(vdt)
    else:
        t["attention_logits"] = t["attention_logits"].to(op_dt)
        if t["ignore_token"] is not None:
            t["ignore_token"] = t["ignore_token"].to(vdt)
    nonfinite = False
    all_meta = False
    replaced: set[str] = set()
    replaced_by_non_tensor: set[str] = set()
    shapes = {name: tuple(x.shape) for name, x in t.items() if isinstance(x, torch.Tensor)}
    tables = {name: t[name].tolist() for name in INDEX_NAMES}
    for mut in case["mutations"]:
        if mut[0] == "nonfinite" and t["sampling_locations"].numel():
            flat = t["sampling_locations"].view(-1)
            gen = torch.Generator().manual_seed(case["seed"] + 1)
            flat[torch.randint(0, flat.numel(), (mut[2],), generator=gen)] = float(mut[1])
            nonfinite = True
    for mut in case["mutations"]:
        kind, params = mut[0], mut[1:]
        if kind == "nonfinite":
            continue
        if kind == "all_meta":
            all_meta = True
            continue
        if kind == "starts":
            starts = t["level_start_index"]
            level = min(params[0], starts.numel() - 1) if isinstance(starts, torch.Tensor) and starts.dim() == 1 else -1
            if level >= 0 and starts.device.type == "cpu":
                starts[level] += 1
            continue
        if kind == "ignore_shape":
            ign = t["ignore_token"]
            M, D = case["M"], case["D"]
            if ign is None or (params[0] == "DM" and M == D):
                continue
            how = params[0]
            t["ignore_token"] = (ign.t().contiguous() if how == "DM" else ign.reshape(-1) if how == "flat"
                                 else ign.reshape(1, 1, 1, -1) if how == "param" else torch.cat([ign, ign[:1]]))
            replaced.add("ignore_token")
            continue
        name = params[0]
        x = t.get(name)
        if name in replaced or (x is None and kind != "non_tensor"):
            continue
        if kind == "non_tensor":
            sub = params[1]
            if sub == "none" and name == "ignore_token":
                t[name] = None
                continue
            t[name] = {"none": None, "int": 3, "float": 0.5, "str": "tensor",
                       "list": (x.tolist() if x is not None and x.numel() < 1000 else [[1, 2]]),
                       "ndarray": (x.double().numpy() if x is not None and x.numel() < 1000 else np.zeros(3))}[sub]
            replaced.add(name)
            replaced_by_non_tensor.add(name)
            why.append(f"{name} is not a tensor")
        elif kind == "meta":
            t[name] = x.to("meta")
            why.append(f"{name} on meta")
            replaced.add(name)
        elif kind == "layout":
            t[name] = _non_contiguous(x, params[1])
        elif kind == "dtype":
            t[name] = x.to(_torch_dtype(params[1]))
        elif kind == "shape":
            t[name] = _reshape(x, params[1], params[2])
    loc = t["sampling_locations"]
    if (case["check_finite"] and isinstance(loc, torch.Tensor) and loc.device.type == "cpu"
            and loc.dtype.is_floating_point and not torch.isfinite(loc).all()):
        why.append("non-finite locations in check mode")
    # reasons that depend only on the final arguments (mutations may undo each other)
    for name, x in t.items():
        if not isinstance(x, torch.Tensor) or name in replaced_by_non_tensor:
            continue
        if tuple(x.shape) != shapes[name]:
            why.append(f"{name} shaped {tuple(x.shape)}, not {shapes[name]}")
        if not x.is_contiguous():
            why.append(f"{name} not contiguous")
        if name in INDEX_NAMES and x.dtype not in (torch.int32, torch.int64):
            why.append(f"{name} dtype {x.dtype}")
        elif name in INDEX_NAMES and x.device.type == "cpu" and x.tolist() != tables[name]:
            why.append(f"{name} values changed")  # a shifted start or a lossy cast: an inconsistent table
    if all_meta:
        for name, x in t.items():
            if isinstance(x, torch.Tensor):
                t[name] = x.to("meta")
    reference = {}  # the op casts every float argument (locations, weights, logits, ignore token) it accepts
    for name, x in t.items():
        if isinstance(x, torch.Tensor) and x.device.type == "cpu" and name not in (*INDEX_NAMES, "image_visible"):
            reference[name] = x.detach().double().clone()
    if nonfinite and "sampling_locations" in reference:
        loc = reference["sampling_locations"]
        bad = ~torch.isfinite(loc).all(-1, keepdim=True)
        reference["sampling_locations"] = torch.where(bad, torch.full_like(loc, -10.0), loc)
    return t, why, dict(reference=reference, all_meta=all_meta, nonfinite=nonfinite)


def _reshape(x, kind: str, dim: int):
    """`x` with one dimension dropped, added or grown by one."""
    import torch

    if x.dim() == 0:
        return x
    d = dim % x.dim()
    if kind == "extra":
        return x.unsqueeze(d)
    if kind == "drop":
        return x.sum(d).to(x.dtype) if x.shape[d] == 0 else x.select(d, 0).contiguous()
    shape = list(x.shape)
    shape[d] += 1
    if x.numel() == 0:
        return torch.zeros(shape, dtype=x.dtype) if _numel(shape) <= 4_000_000 else x
    return torch.cat([x, x.narrow(d, 0, 1)], d)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


TOL_OUT = {"float64": 1e-9, "float32": 2e-5, "float16": 4e-3, "bfloat16": 3e-2}
TOL_GRAD = {"float64": 1e-7, "float32": 2e-4, "float16": 2e-2, "bfloat16": 8e-2}
PRECISION = ["float64", "float32", "float16", "bfloat16"]


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    import torch

    import deem.ops as ops

    result: dict[str, Any] = dict(id=case["id"])
    if case["op"] == "harness_selftest":  # checks the crash and hang attribution of `run_cases`
        if case["action"] == "segv":
            os.kill(os.getpid(), signal.SIGSEGV)
        if case["action"] == "hang":
            time.sleep(3600)
        return dict(result, outcome="correct")
    try:
        args, why, info = build_args(case)
    except (MemoryError, RuntimeError) as err:
        return dict(result, outcome="skipped", detail=f"not buildable: {type(err).__name__}: {err}"[:300])
    if case["check_finite"] and not hasattr(ops, "check_finite"):
        return dict(result, outcome="skipped", detail="this deem has no check_finite mode")
    why += dtype_errors(case, args)
    if info["all_meta"] and why:
        return dict(result, outcome="skipped", detail="invalid call on meta: fake kernels propagate shapes only")
    result["expect"] = "error" if why else "ok"
    result["why"] = why
    names = MSDA_ARGS if case["op"] == "msda" else MMFS_ARGS
    fn = ops.ms_deform_attn if case["op"] == "msda" else ops.mmfs_core
    leaves = []
    call = [args[n] for n in names]
    if case["backward"]:
        for i, name in enumerate(names):
            x = call[i]
            if isinstance(x, torch.Tensor) and x.dtype.is_floating_point and name in DIFFERENTIABLE:
                call[i] = x.detach().requires_grad_()
                leaves.append((name, call[i]))
    try:
        if hasattr(ops, "check_finite"):
            ops.check_finite(case["check_finite"])
        out = fn(*call)
        grads = None
        if leaves and isinstance(out, torch.Tensor) and out.requires_grad:
            gen = torch.Generator().manual_seed(case["seed"] + 2)
            grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device, out.dtype) \
                if out.device.type != "meta" else torch.empty_like(out)
            grads = torch.autograd.grad(out, [x for _, x in leaves], grad_out, allow_unused=True)
    except (ValueError, TypeError, MemoryError) as err:
        detail = f"{type(err).__name__}: {err}"[:300]
        if why:
            return dict(result, outcome="clean_error", detail=detail)
        return dict(result, outcome="unclean_error", detail="valid call refused: " + detail)
    except Exception as err:
        return dict(result, outcome="unclean_error", detail=f"{type(err).__name__}: {err}"[:300])
    if why:
        return dict(result, outcome="garbage", detail="invalid call returned an output: " + "; ".join(why))
    problem = _check_output(case, args, info, out, leaves, grads)
    if problem:
        return dict(result, outcome="garbage", detail=problem)
    return dict(result, outcome="correct")


def dtype_errors(case: dict[str, Any], args: dict[str, Any]) -> list[str]:
    """The value must be floating point; msda weights have the value dtype or float32 (cast for float64)."""
    import torch

    value = args.get("value")
    if not isinstance(value, torch.Tensor):
        return []
    if not value.dtype.is_floating_point:
        return ["value is not floating point"]
    if case["op"] == "msda":
        w = args.get("attention_weights")
        if isinstance(w, torch.Tensor) and value.dtype != torch.float64 and w.dtype not in (value.dtype,
                                                                                             torch.float32):
            return [f"attention_weights {w.dtype} with value {value.dtype}"]
    return []


def _check_output(case, args, info, out, leaves, grads) -> str | None:
    import torch

    import deem.ops as ops

    value = args["value"]
    N, _, M, D = value.shape
    Lq = args["sampling_locations"].shape[1]
    if not isinstance(out, torch.Tensor):
        return f"output is {type(out).__name__}"
    if tuple(out.shape) != (N, Lq, M * D) or out.dtype != value.dtype or out.device != value.device:
        return f"output {tuple(out.shape)} {out.dtype} {out.device}, expected {(N, Lq, M * D)} {value.dtype}"
    for (name, leaf), g in zip(leaves, grads or [None] * len(leaves)):
        if g is not None and (g.shape != leaf.shape or g.dtype != leaf.dtype or g.device != leaf.device):
            return f"grad {name} {tuple(g.shape)} {g.dtype}, expected {tuple(leaf.shape)} {leaf.dtype}"
    if info["all_meta"]:
        return None
    ref_in = dict(info["reference"])
    if N * Lq == 0:
        expected_out = torch.zeros(out.shape, dtype=torch.float64)
        ref_grads = [torch.zeros(leaf.shape, dtype=torch.float64) for _, leaf in leaves]
    else:
        names = MSDA_ARGS if case["op"] == "msda" else MMFS_ARGS
        ref_leaves = {n: ref_in[n].clone().requires_grad_() for n, _ in leaves}
        call = [ref_leaves.get(n, ref_in.get(n, args[n])) for n in names]
        if case["op"] == "msda":
            expected_out = ops.ms_deform_attn_reference(*call)
        else:
            if isinstance(call[-1], torch.Tensor):
                call[-1] = call[-1].reshape(M, D)
            expected_out, _ = ops.mmfs_core_reference(*call)
        ref_grads = []
        if leaves:
            gen = torch.Generator().manual_seed(case["seed"] + 2)
            grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype).double()
            ref_grads = torch.autograd.grad(expected_out, [ref_leaves[n] for n, _ in leaves], grad_out,
                                            allow_unused=True)
            ref_grads = [torch.zeros_like(ref_leaves[n]) if r is None else r for (n, _), r in zip(leaves, ref_grads)]
        expected_out = expected_out.detach()
    names = [str(value.dtype)] + [str(x.dtype) for _, x in leaves]
    low = max(PRECISION.index(n.split(".")[1]) for n in names if n.split(".")[1] in PRECISION)
    err = _rel(out.detach().cpu(), expected_out)
    if not err <= TOL_OUT[PRECISION[low]]:
        return f"output rel err {err:.3g}"
    for (name, _), g, r in zip(leaves, grads or [], ref_grads):
        g = torch.zeros_like(r) if g is None else g
        err = _rel(g.cpu(), r)
        if not err <= TOL_GRAD[PRECISION[low]]:
            return f"grad {name} rel err {err:.3g}"
    return None


def child_main(cases_path: str, results_path: str, threads: int) -> int:
    try:
        import resource

        with open("/proc/self/status") as status:
            vm = next(int(line.split()[1]) for line in status if line.startswith("VmSize"))
        limit = vm * 1024 + (6 << 30)  # torch + deem mapped, plus 6 GiB: huge allocations fail, not swap
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, OSError, StopIteration, ValueError):
        pass
    os.environ.pop("DEEM_CHECK_FINITE", None)
    import torch

    torch.set_num_threads(threads)
    import deem.ops  # noqa: F401 - import errors must end the child before the first case

    with open(cases_path) as src, open(results_path, "a", buffering=1) as dst:
        for line in src:
            case = json.loads(line)
            try:
                result = run_case(case)
            except Exception as err:  # a bug of this harness, reported as such
                result = dict(id=case["id"], outcome="harness_error", detail=f"{type(err).__name__}: {err}"[:300])
            dst.write(json.dumps(result) + "\n")
            dst.flush()
    return 0


# ----------------------------------------------------------------------------------------- parent side

def run_cases(cases: list[dict[str, Any]], batch: int = 200, python: str = sys.executable, threads: int = 2,
              env: dict[str, str] | None = None, case_timeout: float = 60.0,
              startup_timeout: float = 120.0) -> list[dict[str, Any]]:
    """Run `cases` (each with a unique "id") in child processes; returns one result per case, in order.

    A child that dies from a signal, or writes no result for `case_timeout` seconds, is charged to the first
    case without a result; a fresh child resumes after that case."""
    results: dict[int, dict[str, Any]] = {}
    pending = list(cases)
    with tempfile.TemporaryDirectory(prefix="deem-fuzz-") as tmp:
        while pending:
            chunk = pending[:batch]
            cases_path, results_path = Path(tmp, "cases.jsonl"), Path(tmp, "results.jsonl")
            stderr_path = Path(tmp, "stderr.txt")
            cases_path.write_text("".join(json.dumps(c) + "\n" for c in chunk))
            results_path.write_text("")
            cmd = [python, str(Path(__file__).resolve()), "--child", str(cases_path), str(results_path),
                   "--threads", str(threads)]
            status = _supervise(cmd, env, results_path, len(chunk), stderr_path, case_timeout, startup_timeout)
            stderr = stderr_path.read_text(errors="replace")
            done = [json.loads(line) for line in results_path.read_text().splitlines() if line.strip()]
            for r in done:
                results[r["id"]] = r
            rest = chunk[len(done):]
            if status == "ok" and rest:
                raise RuntimeError(f"fuzz child stopped early without an error: {stderr[-2000:]}")
            if status != "ok" and not rest:
                raise RuntimeError(f"fuzz child failed after its last case ({status}): {stderr[-2000:]}")
            if rest:
                if not done and "Traceback" in stderr and "run_case" not in stderr:
                    raise RuntimeError(f"fuzz child could not start ({status}): {stderr[-2000:]}")
                bad = rest[0]
                outcome = "hang" if status == "hang" else "crash"
                results[bad["id"]] = dict(id=bad["id"], outcome=outcome, detail=f"{status}; stderr: {stderr[-600:]}")
                rest = rest[1:]
            pending = rest + pending[batch:]
    return [results[c["id"]] for c in cases]


def _supervise(cmd: list[str], env: dict[str, str] | None, results_path: Path, n_cases: int, stderr_path: Path,
               case_timeout: float, startup_timeout: float) -> str:
    """Run one child to its end; 'ok', 'crash: SIGNAL', 'crash: exit status N' or 'hang'."""
    with open(stderr_path, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
        size, last, limit = 0, time.monotonic(), startup_timeout + case_timeout
        while proc.poll() is None:
            time.sleep(0.02)
            now_size = results_path.stat().st_size
            if now_size != size:
                size, last = now_size, time.monotonic()
                done = results_path.read_text().count("\n")
                limit = case_timeout if done < n_cases else startup_timeout  # then only the exit is left
            elif time.monotonic() - last > limit:
                proc.kill()
                proc.wait()
                return "hang"
    if proc.returncode < 0:
        return f"crash: {signal.Signals(-proc.returncode).name}"
    if proc.returncode != 0:
        return f"crash: exit status {proc.returncode}"
    return "ok"


def summarise(cases: list[dict[str, Any]], results: list[dict[str, Any]]) -> tuple[dict[str, int], list[str]]:
    counts = collections.Counter(r["outcome"] for r in results)
    failures = [f"{r['outcome']}: {r.get('detail', '')}\n    case: {json.dumps(c)}"
                for c, r in zip(cases, results) if r["outcome"] in BAD_OUTCOMES]
    return dict(counts), failures


def draw_cases(n: int, seed: int) -> list[dict[str, Any]]:
    rng = RandomChoices(random.Random(seed))
    return [dict(draw_case(rng), id=i) for i in range(n)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=250, help="cases per child process")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads in the child")
    parser.add_argument("--show", type=int, default=20, help="failing cases to print")
    parser.add_argument("--json", default=None, help="write the counts and failures here")
    parser.add_argument("--child", nargs=2, metavar=("CASES", "RESULTS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args.child[0], args.child[1], args.threads)
    cases = draw_cases(args.cases, args.seed)
    t0 = time.perf_counter()
    results = run_cases(cases, batch=args.batch, threads=args.threads)
    counts, failures = summarise(cases, results)
    print(f"{len(cases)} cases in {time.perf_counter() - t0:.0f} s (seed {args.seed})")
    for key in ("correct", "clean_error", "garbage", "unclean_error", "crash", "hang", "skipped", "harness_error"):
        print(f"  {key:<14}{counts.get(key, 0):>7}")
    for line in failures[:args.show]:
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(counts=counts, failures=failures), indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
