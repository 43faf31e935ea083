"""How deem's custom ops leave PyTorch: as `deem` custom nodes (the dynamo exporter's custom translation table,
ONNX Script functions emitting the nodes of `schemas.py`) or, decomposed, as standard ops (a torch.export
decomposition into `F.grid_sample`, which the exporter writes as ONNX GridSample).

Both need the level sizes as Python values. The model builds them as constant tensors, so they are read from the
exported program (`level_shapes`); a graph whose level table is computed at run time cannot be exported.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from deem.errors import UserError
from deem.export.schemas import DOMAIN, DOMAIN_VERSION, PLUGIN_NAMESPACE, PLUGIN_VERSION, register_schemas
from deem.ops import mmfs_softmax

Shapes = tuple[tuple[int, int], ...]
OPS = {"MsDeformAttn": "ms_deform_attn", "MmfsCore": "mmfs_core"}


class ExportError(UserError, ValueError):
    """A model or graph that cannot be exported as asked; the message says why."""


def _op(name: str):
    return getattr(torch.ops.deem, OPS[name]).default


_PASS_THROUGH = {"clone", "lift_fresh_copy", "detach", "detach_", "_to_copy", "alias"}


def _constant(ep: torch.export.ExportedProgram, node: torch.fx.Node) -> torch.Tensor | None:
    while node.op == "call_function" and getattr(node.target, "_opname", None) in _PASS_THROUGH:
        node = node.args[0]
    if node.op != "placeholder":
        return None
    sig = ep.graph_signature
    name = sig.inputs_to_lifted_tensor_constants.get(node.name) or sig.inputs_to_buffers.get(node.name)
    if name is None:
        return None
    return ep.constants.get(name, ep.state_dict.get(name))


def level_shapes(ep: torch.export.ExportedProgram) -> dict[str, Shapes]:
    """Per deem node kind in the program: the (H, W) levels of its calls (every call must use the same)."""
    found: dict[str, Shapes] = {}
    for node in ep.graph.nodes:
        for name in OPS:
            if node.op != "call_function" or node.target != _op(name):
                continue
            table = _constant(ep, node.args[1])
            if table is None:
                raise ExportError(f"deem::{OPS[name]} gets its spatial_shapes computed at run time; only constant "
                                  "level tables can be exported (the per-level MMFS path of maps that are not "
                                  "proportional to mmfs.spatial_shapes is not exportable)")
            shapes = tuple((int(h), int(w)) for h, w in table.tolist())
            if found.setdefault(name, shapes) != shapes:
                raise ExportError(f"deem::{OPS[name]} is called with different level tables {found[name]} and "
                                  f"{shapes} in one graph; export supports one table per node kind")
    return found


def _attributes(shapes: Shapes) -> dict:
    return {"spatial_shapes": [v for hw in shapes for v in hw], "plugin_namespace": PLUGIN_NAMESPACE,
            "plugin_version": PLUGIN_VERSION}


def translation_table(shapes: dict[str, Shapes]) -> dict[Callable, Callable]:
    """The custom translation table: deem ops -> `deem` domain nodes (ONNX Script, traced by the exporter)."""
    from onnxscript import values

    register_schemas()
    opset = values.Opset(DOMAIN, DOMAIN_VERSION)
    table: dict[Callable, Callable] = {}
    if "MsDeformAttn" in shapes:
        msda_attrs = _attributes(shapes["MsDeformAttn"])
        msda_node = values.Op(opset, "MsDeformAttn")

        def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
            return msda_node(value, sampling_locations, attention_weights, **msda_attrs)

        table[_op("MsDeformAttn")] = ms_deform_attn
    if "MmfsCore" in shapes:
        mmfs_attrs = _attributes(shapes["MmfsCore"])
        mmfs_node = values.Op(opset, "MmfsCore")

        def mmfs_core(value, spatial_shapes, level_start_index, sampling_locations, attention_logits, image_visible,
                      ignore_token=None):
            inputs = [value, sampling_locations, attention_logits, image_visible]
            if ignore_token is not None:
                inputs.append(ignore_token)
            out, lse = mmfs_node(*inputs, **mmfs_attrs, _outputs=2)
            return out, lse

        table[_op("MmfsCore")] = mmfs_core
    return table


# ------------------------------------------------------------------------------------------------ decomposition


def _sample_level(v: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
    """v [B, D, H, W], loc [B, Q, P, 2] normalised (x, y) -> [B, D, Q, P] (bilinear, zero padding)."""
    return F.grid_sample(v, 2 * loc - 1, mode="bilinear", padding_mode="zeros", align_corners=False)


def msda_decomposed(shapes: Shapes) -> Callable:
    """`deem::ms_deform_attn` in standard ops: one GridSample per level, computed in float32 (the kernels' rule:
    locations and accumulation in float32 whatever the value dtype)."""

    def fn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        N, _, M, D = value.shape
        Lq, _, _, P = sampling_locations.shape[1:5]
        acc = sampling_locations.dtype
        out = None
        start = 0
        for lvl, (h, w) in enumerate(shapes):
            v = value[:, start: start + h * w].to(acc).permute(0, 2, 3, 1).reshape(N * M, D, h, w)
            start += h * w
            loc = sampling_locations[:, :, :, lvl].permute(0, 2, 1, 3, 4).reshape(N * M, Lq, P, 2)
            wgt = attention_weights[:, :, :, lvl].to(acc).permute(0, 2, 1, 3).reshape(N * M, 1, Lq, P)
            part = (_sample_level(v, loc) * wgt).sum(-1)  # [N*M, D, Lq]
            out = part if out is None else out + part
        return out.view(N, M, D, Lq).permute(0, 3, 1, 2).reshape(N, Lq, M * D).to(value.dtype)

    return fn


def mmfs_decomposed(shapes: Shapes) -> Callable:
    """`deem::mmfs_core` in standard ops: `mmfs_softmax` (the null-slot softmax over the visible images), one
    GridSample per level over every (batch, image, head), the ignore token with the null slot's weight."""

    def fn(value, spatial_shapes, level_start_index, sampling_locations, attention_logits, image_visible,
           ignore_token=None):
        N, Lq, n_img, M, P, _ = sampling_locations.shape
        D = value.shape[-1]
        acc = sampling_locations.dtype
        weights, lse = mmfs_softmax(attention_logits, image_visible)  # [N, Lq, I, M, L, P], [N, Lq, M]
        S = sum(h * w for h, w in shapes)
        images = value.reshape(N, n_img, S, M, D)
        loc = sampling_locations.permute(0, 2, 3, 1, 4, 5).reshape(N * n_img * M, Lq, P, 2)
        out = None
        start = 0
        for lvl, (h, w) in enumerate(shapes):
            v = images[:, :, start: start + h * w].to(acc).permute(0, 1, 3, 4, 2).reshape(N * n_img * M, D, h, w)
            start += h * w
            wgt = weights[:, :, :, :, lvl].permute(0, 2, 3, 1, 4).reshape(N * n_img * M, 1, Lq, P)
            part = (_sample_level(v, loc) * wgt).sum(-1)  # [N*I*M, D, Lq]
            out = part if out is None else out + part
        out = out.view(N, n_img, M, D, Lq).sum(1).permute(0, 3, 1, 2)  # [N, Lq, M, D]
        if ignore_token is not None:
            out = out + torch.exp(-lse)[..., None] * ignore_token.to(acc)
        return out.reshape(N, Lq, M * D).to(value.dtype), lse

    return fn


def decompose(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """The program with every deem op replaced by its standard-op form."""
    shapes = level_shapes(ep)
    if not shapes:
        return ep
    makers = {"MsDeformAttn": msda_decomposed, "MmfsCore": mmfs_decomposed}
    # only the deem ops: the ONNX exporter runs its own decompositions of the ATen ops afterwards
    return ep.run_decompositions({_op(name): makers[name](s) for name, s in shapes.items()})
