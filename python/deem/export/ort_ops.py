"""The `deem` custom nodes in ONNX Runtime: onnxruntime-extensions Python ops that call deem's compiled kernels
(`torch.ops.deem.*`, the CPU kernels of deem._C; the CUDA ones when the tensors are on a GPU are not used here:
extensions hands the op host arrays).

onnxruntime-extensions registers Python ops in its own domain (`ai.onnx.contrib`), one per op type and dtype
signature, with scalar attributes only. `bind_custom_nodes` therefore rewrites a graph's `deem` nodes for it, in
memory: `deem::MmfsCore` -> `ai.onnx.contrib::DeemMmfsCore_<dtype>`, the INTS attribute `spatial_shapes` as a
comma-separated string. The files on disk keep the `deem` nodes that TensorRT's parser maps to our plugins.
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
        dt = {"float": PyCustomOpDef.dt_float, "float16": PyCustomOpDef.dt_float16}
        f32, boolean = PyCustomOpDef.dt_float, PyCustomOpDef.dt_bool
        attrs = {"spatial_shapes": PyCustomOpDef.dt_string}
        for name, t in dt.items():
            onnx_op(op_type=f"DeemMmfsCore_{name}", inputs=[t, f32, f32, boolean, t], outputs=[t, f32],
                    attrs=attrs)(_mmfs_core)
            for w_name, w in {"float": f32, name: t}.items():
                onnx_op(op_type=f"DeemMsDeformAttn_{name}_{w_name}", inputs=[t, f32, w], outputs=[t],
                        attrs=attrs)(_ms_deform_attn)
        _registered = True
    return get_library_path()


def bind_custom_nodes(model, value_type: str = "float"):
    """A copy of `model` (onnx.ModelProto) whose `deem` nodes are onnxruntime-extensions ops (see the module);
    `value_type` ("float", "float16"): the values' dtype where shape inference cannot tell it."""
    import onnx
    from onnx import helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    inferred = onnx.shape_inference.infer_shapes(model)
    types: dict[str, str] = {}
    for v in list(inferred.graph.input) + list(inferred.graph.output) + list(inferred.graph.value_info):
        types[v.name] = onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type).lower()
    for init in model.graph.initializer:
        types[init.name] = onnx.TensorProto.DataType.Name(init.data_type).lower()
    changed = False
    for node in model.graph.node:
        if node.domain != DOMAIN:
            continue
        node_type = types.get(node.input[0], value_type)
        if node.op_type == "MmfsCore":
            if len(node.input) < 5 or not node.input[4]:
                raise ValueError("MmfsCore without ignore_token is not bound for ONNX Runtime")
            op_type = f"DeemMmfsCore_{node_type}"
        elif node.op_type == "MsDeformAttn":
            op_type = f"DeemMsDeformAttn_{node_type}_{types.get(node.input[2], node_type)}"
        else:
            raise ValueError(f"unknown deem node {node.op_type}")
        shapes = next(a for a in node.attribute if a.name == "spatial_shapes")
        text = ",".join(str(v) for v in shapes.ints)
        del node.attribute[:]
        node.attribute.append(helper.make_attribute("spatial_shapes", text))
        node.domain, node.op_type = EXT_DOMAIN, op_type
        if op_type.startswith("DeemMmfsCore") and (len(node.output) < 2 or not node.output[1]):
            del node.output[1:]
            node.output.append(f"{node.name}_lse")
        changed = True
    if changed:
        kept = [o for o in model.opset_import if o.domain != DOMAIN]
        del model.opset_import[:]
        model.opset_import.extend([*kept, helper.make_opsetid(EXT_DOMAIN, 1)])
    return model
