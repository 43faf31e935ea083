"""The custom ops trace: torch.compile(fullgraph=True), torch.export, and opcheck."""

import pytest
import torch

from deem.ops import mmfs_core, ms_deform_attn
from tests.ops.helpers import mmfs_problem, msda_problem, rel_l2


class MsdaBlock(torch.nn.Module):
    def forward(self, value, spatial_shapes, level_start_index, loc, weights):
        return ms_deform_attn(value, spatial_shapes, level_start_index, loc, weights.softmax(-1)) * 2


class MmfsBlock(torch.nn.Module):
    def forward(self, value, spatial_shapes, level_start_index, loc, logits, visible, ignore):
        return mmfs_core(value, spatial_shapes, level_start_index, loc, logits, visible, ignore) + 1


def _compiled_matches_eager(module, args, backend):
    compiled = torch.compile(module, fullgraph=True, backend=backend)
    leaves = [a.clone().requires_grad_() if a is not None and a.dtype.is_floating_point else a for a in args]
    leaves_c = [a.clone().requires_grad_() if a is not None and a.dtype.is_floating_point else a for a in args]
    eager = module(*leaves)
    out = compiled(*leaves_c)
    assert rel_l2(out, eager) < 1e-6
    eager.square().sum().backward()
    out.square().sum().backward()
    for a, b in zip(leaves, leaves_c):
        if a is not None and a.dtype.is_floating_point:
            assert rel_l2(b.grad, a.grad) < 1e-6


def test_compile_fullgraph_msda():
    p = msda_problem(2, 5, 2, 8, [(4, 4), (2, 2)], 4, dtype=torch.float32)
    _compiled_matches_eager(MsdaBlock(), p.args(), "aot_eager")


def test_compile_fullgraph_mmfs():
    p = mmfs_problem(2, 5, 2, 2, 8, [(4, 4), (2, 2)], 4, dtype=torch.float32)
    _compiled_matches_eager(MmfsBlock(), p.args(), "aot_eager")


def test_export_msda():
    p = msda_problem(2, 5, 2, 8, [(4, 4), (2, 2)], 4, dtype=torch.float32)
    exported = torch.export.export(MsdaBlock(), p.args())
    assert any("deem.ms_deform_attn" in str(n.target) for n in exported.graph.nodes)
    assert torch.allclose(exported.module()(*p.args()), MsdaBlock()(*p.args()))


def test_export_mmfs():
    p = mmfs_problem(2, 5, 2, 2, 8, [(4, 4), (2, 2)], 4, dtype=torch.float32)
    exported = torch.export.export(MmfsBlock(), p.args())
    assert any("deem.mmfs_core" in str(n.target) for n in exported.graph.nodes)
    assert torch.allclose(exported.module()(*p.args()), MmfsBlock()(*p.args()))


def test_opcheck_msda():
    p = msda_problem(1, 3, 2, 4, [(3, 3), (1, 2)], 2, dtype=torch.float64)
    args = list(p.args())
    args[0].requires_grad_()
    args[3].requires_grad_()
    args[4].requires_grad_()
    torch.library.opcheck(torch.ops.deem.ms_deform_attn.default, args)


def test_opcheck_mmfs():
    p = mmfs_problem(1, 3, 2, 2, 4, [(3, 3), (1, 2)], 2, dtype=torch.float64)
    args = list(p.args())
    for i in (0, 3, 4, 6):
        args[i].requires_grad_()
    torch.library.opcheck(torch.ops.deem.mmfs_core.default, args)


@pytest.mark.cuda
def test_compile_inductor_cuda(cuda_device):
    p = msda_problem(2, 64, 4, 64, [(8, 8), (4, 4)], 4, dtype=torch.float32, device=cuda_device)
    _compiled_matches_eager(MsdaBlock(), p.args(), "inductor")
    q = mmfs_problem(2, 64, 3, 4, 64, [(8, 8), (4, 4)], 4, dtype=torch.float32, device=cuda_device)
    _compiled_matches_eager(MmfsBlock(), q.args(), "inductor")
