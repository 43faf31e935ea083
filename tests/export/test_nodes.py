"""The two deem nodes on their own: a module calling `ms_deform_attn` and `mmfs_core` exported with custom nodes and
decomposed, in fp32 and fp16, run by ONNX Runtime and compared with the float64 references."""

from __future__ import annotations

import onnx
import pytest
import torch

from deem.export.lowering import ExportError, decompose, level_shapes, translation_table
from deem.export.runtime import session
from deem.export.schemas import DOMAIN, register_schemas
from deem.ops import mmfs_core, mmfs_core_reference, ms_deform_attn, ms_deform_attn_reference
from tests.export.conftest import rel_l2

SHAPES = ((6, 5), (3, 3), (2, 1))
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3}


class Both(torch.nn.Module):
    """ms_deform_attn over one image's levels and mmfs_core over I images of the same levels."""

    def forward(self, value, loc, weights, value_i, loc_i, logits, visible, ignore):
        spatial = torch.tensor(SHAPES, dtype=torch.int64)
        starts = torch.tensor([0, 30, 39], dtype=torch.int64)
        a = ms_deform_attn(value, spatial, starts, loc, weights)
        b = mmfs_core(value_i, spatial, starts, loc_i, logits, visible, ignore)
        return a, b


def inputs(dtype, N=2, Lq=5, n_img=3, M=2, D=8, P=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    S, L = sum(h * w for h, w in SHAPES), len(SHAPES)
    visible = torch.rand(N, Lq, n_img, generator=g) > 0.3
    visible[0, 1] = False  # a query that sees no image
    return (torch.randn(N, S, M, D, generator=g).to(dtype), torch.rand(N, Lq, M, L, P, 2, generator=g) * 1.2 - 0.1,
            torch.rand(N, Lq, M, L, P, generator=g).to(dtype), torch.randn(N, n_img * S, M, D, generator=g).to(dtype),
            torch.rand(N, Lq, n_img, M, P, 2, generator=g) * 1.2 - 0.1,
            torch.randn(N, Lq, n_img, M, L, P, generator=g), visible, torch.randn(M, D, generator=g).to(dtype))


def export(path, dtype, decomposed: bool):
    from torch.export import Dim

    batch, queries, images = Dim("batch"), Dim("queries"), Dim("images")
    shapes = ({0: batch}, {0: batch, 1: queries}, {0: batch, 1: queries}, {0: batch, 1: images * 41},
              {0: batch, 1: queries, 2: images}, {0: batch, 1: queries, 2: images}, {0: batch, 1: queries, 2: images},
              None)
    ep = torch.export.export(Both(), inputs(dtype), dynamic_shapes=shapes, strict=False)
    table = {}
    if decomposed:
        ep = decompose(ep)
    else:
        table = translation_table(level_shapes(ep))
    torch.onnx.export(ep, dynamo=True, custom_translation_table=table, opset_version=20,
                      output_names=["msda", "mmfs"], verbose=False).save(str(path))
    return onnx.load(str(path))


def references(args):
    value, loc, weights, value_i, loc_i, logits, visible, ignore = (t.double() if t.is_floating_point() else t
                                                                     for t in args)
    spatial = torch.tensor(SHAPES)
    starts = torch.tensor([0, 30, 39])
    return (ms_deform_attn_reference(value, spatial, starts, loc, weights),
            mmfs_core_reference(value_i, spatial, starts, loc_i, logits, visible, ignore)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("decomposed", [False, True], ids=["custom", "decomposed"])
def test_nodes_run_in_onnx_runtime(tmp_path, dtype, decomposed):
    model = export(tmp_path / "nodes.onnx", dtype, decomposed)
    register_schemas()
    onnx.checker.check_model(model, full_check=True)
    ops = {n.op_type for n in model.graph.node if n.domain == DOMAIN}
    assert ops == (set() if decomposed else {"MsDeformAttn", "MmfsCore"})
    if decomposed:
        assert "GridSample" in {n.op_type for n in model.graph.node}
    sess = session(tmp_path / "nodes.onnx", value_type="float16" if dtype == torch.float16 else "float")
    # other sizes than the traced ones: the batch, query and image axes are dynamic
    args = inputs(dtype, N=3, Lq=7, n_img=2, seed=1)
    feed = {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)}
    got = sess.run(None, feed)
    for g, want in zip(got, references(args)):
        assert g.dtype == (torch.zeros(0, dtype=dtype).numpy().dtype)
        assert rel_l2(g, want) <= TOLERANCE[dtype]


def test_computed_level_tables_are_refused():
    class Computed(torch.nn.Module):
        def forward(self, value, loc, weights, spatial):
            starts = torch.cat([spatial.new_zeros(1), (spatial[:, 0] * spatial[:, 1]).cumsum(0)[:-1]])
            return ms_deform_attn(value, spatial, starts, loc, weights)

    args = inputs(torch.float32)
    ep = torch.export.export(Computed(), (args[0], args[1], args[2], torch.tensor(SHAPES)), strict=False)
    with pytest.raises(ExportError, match="spatial_shapes computed at run time"):
        level_shapes(ep)
