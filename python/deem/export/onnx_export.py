"""`export_onnx`: a checkpoint's three graphs (vision, prefill, decode) as ONNX files with dynamic batch, sequence
and image-count axes, the tokenizer, and `manifest.json` (inputs and outputs with their dtypes and axes, the opset,
the custom-node schemas, the model facts a runtime needs).

The graphs go through `torch.export` (non-strict) and the dynamo ONNX exporter. deem's custom ops become `deem`
domain nodes through the exporter's custom translation table, or with `decompose=True` standard ops only
(GridSample), so that any ONNX runtime runs them.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.export import Dim

from deem.export.graphs import DecodeGraph, PrefillGraph, VisionGraph
from deem.export.lowering import ExportError, decompose, level_shapes, translation_table
from deem.export.schemas import DOMAIN, DOMAIN_VERSION, schema_json

OPSET = 20  # GridSample (2-D) since 16, bfloat16 in most ops since 13; 20 is what ONNX Runtime and TensorRT take
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
GRAPHS = ("vision", "prefill", "decode")
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
EXTERNAL_DATA_BYTES = 1 << 30


@dataclass(frozen=True)
class ModelFacts:
    """What a runtime chaining the graphs needs to know about the model."""

    image_size: int
    num_img_token: int
    hidden: int
    layers: int
    kv_heads: int
    head_dim: int
    cross_layers: int
    mmfs_heads: int
    mmfs_head_dim: int
    image_rows: int  # S: feature rows per image
    vision_width: int
    vocab: int
    context: int
    max_images: int
    special_tokens: dict[str, int]

    @classmethod
    def of(cls, model) -> ModelFacts:
        cfg = model.config
        llm = model.llm
        lc = llm.config
        cross = llm.cross_attention_layers()
        attn = cross[0].attn if cross else None
        sides = [int(s) for s in llm.settings.spatial_shapes]
        return cls(int(cfg.image_encoder["image_size"]), int(cfg.num_img_token), lc.hidden_size, lc.num_hidden_layers,
                   lc.num_key_value_heads, getattr(lc, "head_dim", None) or lc.hidden_size // lc.num_attention_heads,
                   len(cross), attn.n_heads if attn else 0, attn.head_dim if attn else 0, sum(s * s for s in sides),
                   int(llm.settings.vision_width), int(cfg.text_vocab_size), int(lc.max_position_embeddings),
                   int(cfg.mmfs_settings.max_num_image_per_seq) - 1, dict(cfg.special_tokens))


# ------------------------------------------------------------------------------------------------ example inputs


def _example_vision(f: ModelFacts, dtype: torch.dtype, device):
    pixels = torch.rand(2, 3, f.image_size, f.image_size, dtype=dtype, device=device)
    images = Dim("images", min=1, max=1024)
    return (pixels,), ({0: images},), ["pixels"], ["image_embeds", "image_features"]


def _prompt_ids(f: ModelFacts, B: int, L: int, n_img: int, device) -> torch.Tensor:
    """Prompts with I images each (<soi> + image tokens), text before and after: any valid ids work for tracing."""
    sp = f.special_tokens
    ids = torch.full((B, L), 5, dtype=torch.long)
    ids[:, 0] = sp["bos"]
    pos = 1
    for _ in range(n_img):
        ids[:, pos] = sp["soi"]
        ids[:, pos + 1: pos + 1 + f.num_img_token] = sp["image"]
        pos += 1 + f.num_img_token
    return ids.to(device)


def _example_prefill(f: ModelFacts, dtype: torch.dtype, device):
    B, n_img = 2, 2
    L = 3 + n_img * (1 + f.num_img_token)
    ids = _prompt_ids(f, B, L, n_img, device)
    mask = torch.ones(B, L, dtype=torch.long, device=device)
    embeds = torch.randn(B, n_img, f.num_img_token, f.hidden, dtype=dtype, device=device)
    feats = torch.randn(B, n_img, f.image_rows, f.vision_width, dtype=dtype, device=device)
    batch, seq, images = Dim("batch", min=1, max=1024), Dim("sequence", min=2, max=f.context), Dim("images", max=1024)
    shapes = ({0: batch, 1: seq}, {0: batch, 1: seq}, {0: batch, 1: images}, {0: batch, 1: images})
    return (ids, mask, embeds, feats), shapes, ["input_ids", "attention_mask", "image_embeds", "image_features"]


def _example_decode(f: ModelFacts, dtype: torch.dtype, device):
    B, T, n_img = 2, 6, 2
    ids = torch.full((B, 1), 5, dtype=torch.long, device=device)
    positions = torch.full((B, 1), T, dtype=torch.long, device=device)
    mask = torch.ones(B, T + 1, dtype=torch.long, device=device)
    past = [torch.randn(B, f.kv_heads, T, f.head_dim, dtype=dtype, device=device) for _ in range(2 * f.layers)]
    values = [torch.randn(B, n_img * f.image_rows, f.mmfs_heads, f.mmfs_head_dim, dtype=dtype, device=device)
              for _ in range(f.cross_layers)]
    visible = torch.ones(B, n_img, dtype=torch.bool, device=device)
    has_images = torch.ones(B, dtype=torch.bool, device=device)
    batch, past_len = Dim("batch", min=1, max=1024), Dim("past_sequence", min=1, max=f.context - 1)
    images = Dim("images", max=1024)
    shapes = ({0: batch}, {0: batch}, {0: batch, 1: past_len + 1}, [{0: batch, 2: past_len}] * len(past),
              [{0: batch, 1: images * f.image_rows}] * len(values), {0: batch, 1: images}, {0: batch})
    return (ids, positions, mask, past, values, visible, has_images), shapes


# ------------------------------------------------------------------------------------------------ export


def _to_onnx(module: torch.nn.Module, args: tuple, dynamic_shapes, input_names: list[str], output_names: list[str],
             path: Path, decomposed: bool) -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False)
    shapes = level_shapes(ep)
    table = {}
    if decomposed:
        ep = decompose(ep)
    else:
        table = translation_table(shapes)
    program = torch.onnx.export(ep, opset_version=OPSET, dynamo=True, custom_translation_table=table,
                                input_names=input_names, output_names=output_names, optimize=True, verbose=False)
    if program is None:  # pragma: no cover - torch returns None only for the legacy exporter
        raise ExportError("torch.onnx.export returned no program")
    # protobuf files stop at 2 GB: larger graphs keep their weights in path + ".data"
    weights = sum(t.numel() * t.element_size() for t in ep.state_dict.values()) + sum(
        t.numel() * t.element_size() for t in ep.constants.values() if isinstance(t, torch.Tensor))
    program.save(str(path), external_data=weights > EXTERNAL_DATA_BYTES)
    return {name: [list(s) for s in v] for name, v in shapes.items()}


# the named axes of each graph: (input, axis) -> name; the exporter writes symbols (s0, s1 + 1, ...)
AXES = {
    "vision": {("pixels", 0): "images"},
    "prefill": {("input_ids", 0): "batch", ("input_ids", 1): "sequence", ("image_embeds", 1): "images"},
    "decode": {("input_ids", 0): "batch", ("past_key.0", 2): "past_sequence", ("image_visible", 1): "images"},
}


def _name_axes(path: Path, axes: dict[tuple[str, int], str]) -> None:
    """Rewrite the exporter's dimension symbols as the axis names of `axes` in every shape of the graph file."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    names: dict[str, str] = {}
    for v in model.graph.input:
        for axis, d in enumerate(v.type.tensor_type.shape.dim):
            if (v.name, axis) in axes and d.dim_param:
                names[d.dim_param] = axes[(v.name, axis)]
    if not names:
        return
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, sorted(names, key=len, reverse=True))) + r")\b")
    for v in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for d in v.type.tensor_type.shape.dim:
            if d.dim_param:
                d.dim_param = pattern.sub(lambda m: names[m.group(1)], d.dim_param)
    onnx.save(model, str(path))  # external-data references (if any) are kept as they are


def _io(model_proto) -> dict[str, Any]:
    import onnx

    def describe(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_param or d.dim_value for d in t.shape.dim]
            out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                        "shape": dims})
        return out

    return {"inputs": describe(model_proto.graph.input), "outputs": describe(model_proto.graph.output)}


def _graph_job(model, name: str, facts: ModelFacts):
    param = next(model.parameters())
    dtype, device = param.dtype, param.device
    if name == "vision":
        return (VisionGraph(model), *_example_vision(facts, dtype, device))
    if name == "prefill":
        graph = PrefillGraph(model)
        return (graph, *_example_prefill(facts, dtype, device), graph.output_names())
    if name == "decode":
        graph = DecodeGraph(model)
        return (graph, *_example_decode(facts, dtype, device), graph.input_names(), graph.output_names())
    raise ExportError(f"unknown graph {name!r} ({', '.join(GRAPHS)})")


@torch.no_grad()
def export_graph(model, name: str, path: str | Path, decompose_ops: bool = False) -> dict[str, Any]:
    """Export one graph ("vision", "prefill" or "decode") of `model` (in eval mode, in the dtype and on the device
    to export) to `path`; returns its manifest entry."""
    import onnx

    path = Path(path)
    facts = ModelFacts.of(model)
    if facts.cross_layers == 0:
        raise ExportError("the model has no cross-attention layers: nothing carries the images to the LLM")
    module, args, shapes, inputs, outputs = _graph_job(model, name, facts)
    levels = _to_onnx(module, args, shapes, inputs, outputs, path, decompose_ops)
    _name_axes(path, AXES[name])
    proto = onnx.load(str(path), load_external_data=False)
    return {"file": path.name, **_io(proto),
            "custom_nodes": sorted({n.op_type for n in proto.graph.node if n.domain == DOMAIN}),
            "level_shapes": levels}


def export_model(model, out: str | Path, dtype: str = "fp32", decompose_ops: bool = False,
                 tokenizer_dir: str | Path | None = None, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Export `model` (a `DeemModel`) into directory `out`: vision.onnx, prefill.onnx, decode.onnx, tokenizer/
    (copied from `tokenizer_dir`) and manifest.json. Returns the manifest."""
    import onnx

    if dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r} ({', '.join(DTYPES)})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch_dtype = DTYPES[dtype]
    param = next(model.parameters())
    if (param.dtype, param.device) != (torch_dtype, torch.device(device)):
        model = copy.deepcopy(model).to(device=device, dtype=torch_dtype)  # the caller's model stays as it is
    model = model.eval()
    graphs = {name: export_graph(model, name, out / f"{name}.onnx", decompose_ops) for name in GRAPHS}
    if tokenizer_dir is not None:
        shutil.copytree(tokenizer_dir, out / "tokenizer", dirs_exist_ok=True)
    manifest = {
        "format": MANIFEST_FORMAT,
        "dtype": dtype,
        "decomposed": bool(decompose_ops),
        "opset": {"": OPSET, **({} if decompose_ops else {DOMAIN: DOMAIN_VERSION})},
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "model": facts_dict(model),
        "graphs": graphs,
        "tokenizer": "tokenizer" if tokenizer_dir is not None else None,
        "custom_nodes": None if decompose_ops else schema_json(),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def facts_dict(model) -> dict[str, Any]:
    return dict(ModelFacts.of(model).__dict__)


def export_onnx(checkpoint: str | Path, out: str | Path, dtype: str = "fp32", decompose_ops: bool = False
                ) -> dict[str, Any]:
    """`deem export onnx`: load `checkpoint` (a `deem train export` directory with tokenizer/) on the CPU and
    export it (see `export_model`)."""
    from deem.infer import InferenceError, load_checkpoint

    try:
        model, _ = load_checkpoint(checkpoint, "cpu", torch.float32)
    except InferenceError as exc:
        raise ExportError(str(exc)) from exc
    return export_model(model, out, dtype, decompose_ops, Path(checkpoint) / "tokenizer")


def load_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of an export directory (ExportError naming what is missing)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ExportError(f"{directory} is not a deem ONNX export (no {MANIFEST}; `deem export onnx` writes it)")
    manifest = json.loads(path.read_text())
    for name in GRAPHS:
        if not (Path(directory) / f"{name}.onnx").is_file():
            raise ExportError(f"{directory} has no {name}.onnx")
    return manifest
