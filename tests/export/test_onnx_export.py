"""`deem export onnx` of the tiny model: files and manifest, the checker, the custom nodes, ONNX Runtime numerics
against the PyTorch graphs, and greedy answers of the three chained graphs equal to the inference engine's."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from deem.export.graphs import DecodeGraph, PrefillGraph, VisionGraph
from deem.export.runtime import OnnxPipeline, session
from deem.export.schemas import DOMAIN, register_schemas
from tests.export.conftest import rel_l2

GRAPHS = ("vision", "prefill", "decode")


def images(model, n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    r = model.config.image_encoder["image_size"]
    return [torch.rand(3, r, r, generator=g) for _ in range(n)]


def prompt(model, n_images: int, text: list[int]) -> list[int]:
    sp, nt = model.config.special_tokens, model.config.num_img_token
    ids = [sp["bos"]]
    for k in range(n_images):
        ids += [10 + k, sp["soi"]] + [sp["image"]] * nt
    return ids + text


def test_files_manifest_and_named_axes(exported, model):
    manifest = json.loads((exported / "manifest.json").read_text())
    assert {p.name for p in exported.iterdir()} >= {"vision.onnx", "prefill.onnx", "decode.onnx", "tokenizer",
                                                    "manifest.json"}
    assert any((exported / "tokenizer").iterdir())
    assert all((exported / f"{g}.onnx.data").is_file() for g in GRAPHS)  # external weights (see the fixture)
    assert manifest["dtype"] == "fp32" and manifest["opset"] == {"": 20, DOMAIN: 1}
    assert set(manifest["custom_nodes"]["nodes"]) == {"MsDeformAttn", "MmfsCore"}
    assert manifest["model"]["layers"] == model.config.llm["num_hidden_layers"]
    decode = {i["name"]: i for i in manifest["graphs"]["decode"]["inputs"]}
    assert decode["past_key.0"]["shape"][0] == "batch" and decode["past_key.0"]["shape"][2] == "past_sequence"
    assert decode["attention_mask"]["shape"] == ["batch", "past_sequence + 1"]
    assert decode["image_visible"]["dtype"] == "bool" and decode["image_visible"]["shape"] == ["batch", "images"]
    prefill = {i["name"]: i for i in manifest["graphs"]["prefill"]["inputs"]}
    assert prefill["input_ids"]["shape"] == ["batch", "sequence"]
    assert prefill["image_features"]["shape"][:2] == ["batch", "images"]
    outputs = [o["name"] for o in manifest["graphs"]["prefill"]["outputs"]]
    n, c = manifest["model"]["layers"], manifest["model"]["cross_layers"]
    assert outputs[0] == "logits" and outputs[-2:] == ["image_visible", "has_images"]
    assert len([o for o in outputs if o.startswith("present_")]) == 2 * n
    assert len([o for o in outputs if o.startswith("cross_values")]) == c


def test_checker_full_check(export_dir):
    register_schemas()
    for name in GRAPHS:
        onnx.checker.check_model(str(export_dir / f"{name}.onnx"), full_check=True)


def test_custom_nodes_and_decomposition(exported, decomposed, model):
    sides = [int(s) for s in model.llm.settings.spatial_shapes]
    cross = len(model.llm.cross_attention_layers())
    for name in ("prefill", "decode"):
        graph = onnx.load(str(exported / f"{name}.onnx")).graph
        nodes = [n for n in graph.node if n.domain == DOMAIN]
        assert [n.op_type for n in nodes] == ["MmfsCore"] * cross
        for node in nodes:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert list(attrs["spatial_shapes"]) == [v for s in sides for v in (s, s)]
            assert attrs["plugin_namespace"] == b"deem" and attrs["plugin_version"] == b"1"
            assert len(node.input) == 5  # value, locations, logits, visibility, ignore token
        plain = onnx.load(str(decomposed / f"{name}.onnx")).graph
        assert not any(n.domain == DOMAIN for n in plain.node)
        assert sum(n.op_type == "GridSample" for n in plain.node) == cross * len(sides)
    assert not any(n.domain == DOMAIN for n in onnx.load(str(exported / "vision.onnx")).graph.node)


def _torch_inputs(model, pipe: OnnxPipeline):
    """Vision, prefill and decode inputs for a batch with 2, 1 and 0 images."""
    imgs = images(model, 3)
    rows = [prompt(model, 2, [40, 41, 42]), prompt(model, 1, [50]), prompt(model, 0, [60, 61, 62, 63])]
    per_row = [[i.numpy() for i in imgs[:2]], [imgs[2].numpy()], []]
    return torch.stack(imgs), rows, per_row


def test_onnx_runtime_matches_pytorch(export_dir, model):
    """Every output of every graph within rel. L2 1e-4 of the PyTorch graph modules (fp32)."""
    pipe = OnnxPipeline(export_dir)
    pixels, rows, per_row = _torch_inputs(model, pipe)
    with torch.no_grad():
        embeds, feats = VisionGraph(model)(pixels)
    onnx_embeds, onnx_feats = pipe.vision(pixels.numpy())
    assert rel_l2(onnx_embeds, embeds) <= 1e-4 and rel_l2(onnx_feats, feats) <= 1e-4

    state = pipe.prefill(rows, per_row)
    B, L = state["attention_mask"].shape
    ids = torch.full((B, L), model.config.special_tokens["pad"], dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.tensor(r)
    packed_e, packed_f = pipe.pack_images(per_row)
    graph = PrefillGraph(model)
    with torch.no_grad():
        ref = graph(ids, torch.from_numpy(state["attention_mask"]), torch.from_numpy(packed_e),
                    torch.from_numpy(packed_f))
    for name, want in zip(graph.output_names(), ref):
        got = state[name]
        if want.dtype == torch.bool:
            assert np.array_equal(got, want.numpy()), name
        elif name.startswith("present_"):  # padded positions hold finite garbage in both: compare valid columns
            for b, r in enumerate(rows):
                assert rel_l2(got[b, :, : len(r)], want[b, :, : len(r)]) <= 1e-4, name
        else:
            assert rel_l2(got, want) <= 1e-4, name

    tokens = state["logits"].argmax(-1)
    decode = DecodeGraph(model)
    past = [torch.from_numpy(state[n.replace("past_", "present_")]) for n in pipe.decode_inputs if "past_" in n]
    values = [torch.from_numpy(state[f"cross_values.{k}"]) for k in range(len(decode.parts.cross))]
    mask = np.concatenate([state["attention_mask"], np.ones((B, 1), np.int64)], axis=1)
    with torch.no_grad():
        ref = decode(torch.from_numpy(tokens)[:, None], torch.from_numpy(state["lengths"])[:, None],
                     torch.from_numpy(mask), past, values, torch.from_numpy(state["image_visible"]),
                     torch.from_numpy(state["has_images"]))
    out = pipe.decode_step(state, tokens, 0)
    assert rel_l2(out, ref[0]) <= 1e-4
    for name, want in zip(decode.output_names()[1:], ref[1:]):
        got = torch.from_numpy(state[name])
        for b, r in enumerate(rows):
            cols = [*range(len(r)), got.shape[2] - 1]  # the prompt and the new token
            assert rel_l2(got[b, :, cols], want[b, :, cols]) <= 1e-4, name


def test_chained_greedy_equals_the_engine(export_dir, model):
    """The three ONNX graphs chained by OnnxPipeline give the engine's greedy tokens (batch with 2, 1, 0 images)."""
    from deem.infer import InferenceEngine, Request, SamplingParams

    pipe = OnnxPipeline(export_dir)
    pixels, rows, per_row = _torch_inputs(model, pipe)
    imgs = list(pixels)
    params = SamplingParams(max_new_tokens=10, min_new_tokens=2)
    engine = InferenceEngine(model)
    reqs = [Request(rows[0], imgs[:2], params), Request(rows[1], imgs[2:], params), Request(rows[2], [], params)]
    want = [c.sequences[0] for c in engine.generate(reqs)]
    got = pipe.greedy(rows, per_row, max_new_tokens=10, min_new_tokens=2)
    assert [g.tokens for g in got] == [w.tokens for w in want]
    assert [g.finish_reason for g in got] == [w.finish_reason for w in want]
    assert len({tuple(w.tokens) for w in want}) == 3  # the rows really differ


def test_pipeline_reports_bad_requests(exported, model):
    from deem.export.lowering import ExportError

    pipe = OnnxPipeline(exported)
    with pytest.raises(ExportError, match="image runs"):
        pipe.greedy([prompt(model, 2, [5])], [[images(model, 1)[0].numpy()]])
    with pytest.raises(ExportError, match="token ids"):
        pipe.greedy([[1, 10_000]], [[]])
    with pytest.raises(ExportError, match="context"):
        pipe.greedy([[1, 5]], [[]], max_new_tokens=10_000)


def test_custom_node_session_binds_deem_kernels(exported):
    """Without the binding ONNX Runtime refuses the deem nodes; `session` binds them to deem's kernels."""
    import onnxruntime as ort

    with pytest.raises(Exception, match=r"MmfsCore|deem"):
        ort.InferenceSession(str(exported / "decode.onnx"), providers=["CPUExecutionProvider"])
    sess = session(exported / "decode.onnx")
    assert "logits" in [o.name for o in sess.get_outputs()]


def test_fp16_decode_graph_within_2e3_of_fp32(model, tmp_path):
    """The decode graph exported in fp16 (deem custom nodes), run by ONNX Runtime, against the fp32 PyTorch graph."""
    import copy

    from deem.export.onnx_export import export_graph

    half = copy.deepcopy(model).half().eval()
    export_graph(half, "decode", tmp_path / "decode.onnx")
    rows = [prompt(model, 2, [40, 41, 42]), prompt(model, 1, [50, 51, 52, 53, 54, 55])]
    L = max(len(r) for r in rows)
    ids = torch.full((2, L), model.config.special_tokens["pad"], dtype=torch.long)
    mask = torch.zeros(2, L, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r)], mask[b, : len(r)] = torch.tensor(r), 1
    with torch.no_grad():
        embeds, feats = VisionGraph(model)(torch.stack(images(model, 4)))
        packed_e = torch.stack([embeds[:2], embeds[2:]])
        packed_f = torch.stack([feats[:2], feats[2:]])
        packed_e[1, 1], packed_f[1, 1] = 0, 0  # the second row has one image
        prefill = PrefillGraph(model)
        state = dict(zip(prefill.output_names(), prefill(ids, mask, packed_e, packed_f)))
        decode = DecodeGraph(model)
        past = [state[n.replace("past_", "present_")] for n in decode.input_names() if n.startswith("past_")]
        values = [state[n] for n in decode.input_names() if n.startswith("cross_values")]
        token = state["logits"].argmax(-1)[:, None]
        positions = mask.sum(1, keepdim=True)
        mask1 = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        ref = decode(token, positions, mask1, past, values, state["image_visible"], state["has_images"])
    sess = session(tmp_path / "decode.onnx", value_type="float16")
    feed = {"input_ids": token.numpy(), "position_ids": positions.numpy(), "attention_mask": mask1.numpy(),
            "image_visible": state["image_visible"].numpy(), "has_images": state["has_images"].numpy()}
    for n in decode.input_names():
        if n.startswith(("past_", "cross_values")):
            feed[n] = state[n.replace("past_", "present_")].numpy().astype(np.float16)
    got = sess.run(None, feed)
    assert got[0].dtype == np.float32 and rel_l2(got[0], ref[0]) <= 2e-3
    for b, r in enumerate(rows):  # the caches on the valid columns (padding columns hold unused values)
        cols = [*range(len(r)), L]
        for g, w in zip(got[1:], ref[1:]):
            assert g.dtype == np.float16 and rel_l2(torch.from_numpy(g.astype(np.float32))[b, :, cols],
                                                    w[b, :, cols]) <= 2e-3
