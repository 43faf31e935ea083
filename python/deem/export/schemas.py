"""The custom ONNX nodes of the `deem` domain: their schemas (registered with `onnx.defs`, so `onnx.checker` checks
the nodes' inputs, attributes and types) and the same facts as JSON for the manifest and docs/export.md.

Each node maps 1:1 to a TensorRT IPluginV3 of the same name in plugin namespace `deem` (cpp/tensorrt/) and, in ONNX
Runtime, to an onnxruntime-extensions Python op over deem's kernels (`deem.export.ort_ops`). The level sizes are
attributes (the kernels take them on the host, by value: no device shape tensor is read, launches stay CUDA-graph
capturable), flattened as [H_0, W_0, H_1, W_1, ...].
"""

from __future__ import annotations

from typing import Any

DOMAIN = "deem"
DOMAIN_VERSION = 1
PLUGIN_NAMESPACE = "deem"
PLUGIN_VERSION = "1"

VALUE_TYPES = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]

# name -> (inputs, outputs, attributes, doc); inputs/outputs: (name, type or constraint, shape, optional)
NODES: dict[str, dict[str, Any]] = {
    "MsDeformAttn": {
        "doc": "Multi-scale deformable attention (Deformable-DETR semantics, spec/kernels.md §1.2): bilinear "
               "sampling with zero padding of every level at (x*W - 0.5, y*H - 0.5), weighted and summed over "
               "levels and points.",
        "inputs": [
            ("value", "T", "[N, S, M, D], S = sum of H_l*W_l; D in {32, 64, 128} for the CUDA kernel", False),
            ("sampling_locations", "tensor(float)", "[N, Lq, M, L, P, 2] normalised (x, y)", False),
            ("attention_weights", "TW", "[N, Lq, M, L, P] (already normalised)", False),
        ],
        "outputs": [("output", "T", "[N, Lq, M*D]", False)],
        "attributes": {"spatial_shapes": ("ints", "[H_0, W_0, ..., H_{L-1}, W_{L-1}] of the L levels")},
    },
    "MmfsCore": {
        "doc": "DEEM's fused MMFS core (deem/mmfs.h): deformable attention over I images x L levels, one location "
               "per (image, point) shared by the levels of the image, an in-kernel softmax with a null slot of "
               "logit 0 over the visible images, and the ignore token added with the null slot's weight.",
        "inputs": [
            ("value", "T", "[N, I*S, M, D]: I images, each with the L levels of spatial_shapes", False),
            ("sampling_locations", "tensor(float)", "[N, Lq, I, M, P, 2] normalised (x, y)", False),
            ("attention_logits", "tensor(float)", "[N, Lq, I, M, L, P] raw logits", False),
            ("image_visible", "tensor(bool)", "[N, Lq, I]: which images each query attends to", False),
            ("ignore_token", "T", "[M, D] optional: one vector per head, added with the null slot's weight", True),
        ],
        "outputs": [
            ("output", "T", "[N, Lq, M*D]", False),
            ("lse", "tensor(float)", "[N, Lq, M] log(1 + sum exp z) over the visible entries (optional)", True),
        ],
        "attributes": {"spatial_shapes": ("ints", "[H_0, W_0, ..., H_{L-1}, W_{L-1}] of one image's L levels")},
    },
}
COMMON_ATTRIBUTES = {
    "plugin_namespace": ("string", f"TensorRT plugin namespace (always {PLUGIN_NAMESPACE!r})"),
    "plugin_version": ("string", f"TensorRT plugin version (always {PLUGIN_VERSION!r})"),
}
TYPE_CONSTRAINTS = {
    "T": (VALUE_TYPES, "value / output dtype"),
    "TW": (VALUE_TYPES, "attention weights: the value dtype or float32"),
}

_registered = False


def register_schemas() -> None:
    """Register the `deem` nodes with onnx.defs (once per process)."""
    global _registered
    if _registered:
        return
    from onnx import defs

    fp = defs.OpSchema.FormalParameter
    optional = defs.OpSchema.FormalParameterOption.Optional
    single = defs.OpSchema.FormalParameterOption.Single
    attr_types = {"ints": defs.OpSchema.AttrType.INTS, "string": defs.OpSchema.AttrType.STRING}
    for name, node in NODES.items():
        uses = {t for _, t, _, _ in node["inputs"] + node["outputs"]}
        constraints = [(k, types, desc) for k, (types, desc) in TYPE_CONSTRAINTS.items() if k in uses]
        attributes = [defs.OpSchema.Attribute(a, attr_types[kind], desc, required=True)
                      for a, (kind, desc) in node["attributes"].items()]
        attributes += [defs.OpSchema.Attribute(a, attr_types[kind], desc, required=False)
                       for a, (kind, desc) in COMMON_ATTRIBUTES.items()]
        schema = defs.OpSchema(
            name, DOMAIN, DOMAIN_VERSION, doc=node["doc"],
            inputs=[fp(n, t, desc, param_option=optional if opt else single) for n, t, desc, opt in node["inputs"]],
            outputs=[fp(n, t, desc, param_option=optional if opt else single) for n, t, desc, opt in node["outputs"]],
            type_constraints=constraints, attributes=attributes)
        if not defs.has(name, DOMAIN_VERSION, DOMAIN):
            defs.register_schema(schema)
    _registered = True


def schema_json() -> dict[str, Any]:
    """The node schemas as JSON (for the manifest)."""
    def params(items):
        return [{"name": n, "type": t, "shape": s, "optional": o} for n, t, s, o in items]

    return {
        "domain": DOMAIN, "version": DOMAIN_VERSION,
        "tensorrt": {"plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": PLUGIN_VERSION},
        "type_constraints": {k: {"types": v[0], "doc": v[1]} for k, v in TYPE_CONSTRAINTS.items()},
        "nodes": {name: {"doc": node["doc"], "inputs": params(node["inputs"]), "outputs": params(node["outputs"]),
                         "attributes": {**{a: {"type": k, "doc": d} for a, (k, d) in node["attributes"].items()},
                                        **{a: {"type": k, "doc": d} for a, (k, d) in COMMON_ATTRIBUTES.items()}}}
                  for name, node in NODES.items()},
    }
