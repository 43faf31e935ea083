"""The `deem` custom nodes in ONNX Runtime: onnxruntime-extensions Python ops that call deem's compiled kernels
(`torch.ops.deem.*`, the CPU kernels of deem._C; the CUDA ones when the tensors are on a GPU are not used here:
extensions hands the op host arrays).

onnxruntime-extensions registers Python ops in its own domain (`ai.onnx.contrib`), with one dtype signature per op
type, scalar attributes only and float32 (not float16) tensors. `bind_custom_nodes` therefore rewrites a graph's
`deem` nodes for it, in memory: `deem::MmfsCore` -> `ai.onnx.contrib::DeemMmfsCore`, the INTS attribute
`spatial_shapes` as a comma-separated string, Casts around the op in fp16 graphs. The files on disk keep the `deem`
nodes that TensorRT's parser maps to our plugins.
"""

from __future__ import annotations

import numpy as np

from deem.export.schemas import DOMAIN

EXT_DOMAIN = "ai.onnx.contrib"
_registered = False


def _shapes(spatial_shapes: str) -> tuple[np.ndarray, np.ndarray]:
    hw = [int(v) for v in spatial_shapes.split(",")]
    shapes = np.asarray(hw, dtype=np.int64).reshape(-1, 2)
    sizes = shapes[:, 0] * shapes[:, 1]
    return shapes, np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)


def _mmfs_core(value, loc, logits, visible, ignore, spatial_shapes):
    import torch

    shapes, starts = _shapes(spatial_shapes)
    out, lse = torch.ops.deem.mmfs_core(
        torch.from_numpy(np.ascontiguousarray(value)), torch.from_numpy(shapes), torch.from_numpy(starts),
        torch.from_numpy(np.ascontiguousarray(loc, dtype=np.float32)),
        torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32)),
        torch.from_numpy(np.ascontiguousarray(visible, dtype=np.bool_)),
        torch.from_numpy(np.ascontiguousarray(ignore)))
    return out.numpy(), lse.numpy()


def _ms_deform_attn(value, loc, weights, spatial_shapes):
    import torch

    shapes, starts = _shapes(spatial_shapes)
    out = torch.ops.deem.ms_deform_attn(
        torch.from_numpy(np.ascontiguousarray(value)), torch.from_numpy(shapes), torch.from_numpy(starts),
        torch.from_numpy(np.ascontiguousarray(loc, dtype=np.float32)), torch.from_numpy(np.ascontiguousarray(weights)))
    return out.numpy()


def register_ops() -> str:
    """Register the Python ops with onnxruntime-extensions (once); returns its custom-op library path."""
    global _registered
    from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op

    if not _registered:
        f32, boolean = PyCustomOpDef.dt_float, PyCustomOpDef.dt_bool
        attrs = {"spatial_shapes": PyCustomOpDef.dt_string}
        onnx_op(op_type="DeemMmfsCore", inputs=[f32, f32, f32, boolean, f32], outputs=[f32, f32],
                attrs=attrs)(_mmfs_core)
        onnx_op(op_type="DeemMsDeformAttn", inputs=[f32, f32, f32], outputs=[f32], attrs=attrs)(_ms_deform_attn)
        _registered = True
    return get_library_path()


def bind_custom_nodes(model, value_type: str = "float"):
    """A copy of `model` (onnx.ModelProto) whose `deem` nodes are onnxruntime-extensions ops (see the module).

    Its Python-op API takes float32 tensors only (a float16 tensor aborts the process: "Type float16 not supported
    by python customops api"), so 16-bit values and outputs are cast to float32 around the op: in fp16 graphs the
    op then runs deem's float32 kernel. `value_type` ("float", "float16"): the values' dtype where shape inference
    cannot tell it."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    inferred = onnx.shape_inference.infer_shapes(model)
    types: dict[str, int] = {}
    for v in list(inferred.graph.input) + list(inferred.graph.output) + list(inferred.graph.value_info):
        types[v.name] = v.type.tensor_type.elem_type
    for init in model.graph.initializer:
        types[init.name] = init.data_type
    default = TensorProto.FLOAT16 if value_type == "float16" else TensorProto.FLOAT
    nodes, changed = [], False
    for node in model.graph.node:
        if node.domain != DOMAIN:
            nodes.append(node)
            continue
        if node.op_type not in ("MmfsCore", "MsDeformAttn"):
            raise ValueError(f"unknown deem node {node.op_type}")
        if node.op_type == "MmfsCore" and (len(node.input) < 5 or not node.input[4]):
            raise ValueError("MmfsCore without ignore_token is not bound for ONNX Runtime")
        shapes = next(a for a in node.attribute if a.name == "spatial_shapes")
        inputs = list(node.input)
        for k, name in enumerate(inputs):
            if types.get(name, default if k == 0 else TensorProto.FLOAT) in (TensorProto.FLOAT16, TensorProto.BFLOAT16):
                inputs[k] = f"{node.name}_in{k}_f32"
                nodes.append(helper.make_node("Cast", [name], [inputs[k]], to=TensorProto.FLOAT))
        out_type = types.get(node.input[0], default)
        outputs = list(node.output)
        if node.op_type == "MmfsCore" and (len(outputs) < 2 or not outputs[1]):
            outputs = [outputs[0], f"{node.name}_lse"]
        first = outputs[0]
        if out_type != TensorProto.FLOAT:
            outputs[0] = f"{node.name}_out_f32"
        nodes.append(helper.make_node(f"Deem{node.op_type}", inputs, outputs, name=node.name, domain=EXT_DOMAIN,
                                      spatial_shapes=",".join(str(v) for v in shapes.ints)))
        if out_type != TensorProto.FLOAT:
            nodes.append(helper.make_node("Cast", [outputs[0]], [first], to=out_type))
        changed = True
    if changed:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        kept = [o for o in model.opset_import if o.domain != DOMAIN]
        del model.opset_import[:]
        model.opset_import.extend([*kept, helper.make_opsetid(EXT_DOMAIN, 1)])
    return model
