"""The one strict weight loader (`deem.models.weights.load_weights`) and the HF LLaMA key map."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deem.models import DeemModel, tiny
from deem.models.loading import hf_llama_filter, load_llama
from deem.models.weights import CheckpointError, LoadReport, load_weights, matches

pytestmark = pytest.mark.usefixtures("one_thread")


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 2)
        self.b = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
        self.register_buffer("table", torch.zeros(4))


def fresh_state(seed: int = 1) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: torch.randn_like(v) for k, v in Small().state_dict().items()}


def test_exact_state_loads_and_reports_everything():
    m, state = Small(), fresh_state()
    report = load_weights(m, state, source="x.bin")
    assert isinstance(report, LoadReport) and report.ok
    assert report.loaded == sorted(state) and not report.missing and not report.ignored
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert "x.bin: 7 tensors loaded" in report.summary()


def test_every_problem_is_named_in_one_error_and_nothing_is_copied():
    m, state = Small(), fresh_state()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    del state["b.1.bias"]
    state["c.weight"] = torch.zeros(1)
    state["a.weight"] = torch.zeros(5, 5)
    with pytest.raises(CheckpointError) as e:
        load_weights(m, state, source="ckpt.bin", hints={"unexpected": "use drop", "missing": "use allow_missing"},
                     origin={"c.weight": "orig.c.weight"})
    msg = str(e.value)
    assert msg.startswith("ckpt.bin: ")
    assert "1 checkpoint keys the model does not have: ['orig.c.weight'] (use drop)" in msg
    assert "1 model keys are not in the checkpoint: ['b.1.bias'] (use allow_missing)" in msg
    assert "shape mismatch for 1 tensors: a.weight: checkpoint (5, 5) vs model (2, 3)" in msg
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_drop_allow_missing_and_non_strict():
    m, state = Small(), fresh_state()
    del state["b.1.weight"], state["b.1.bias"]
    state["extra.weight"] = torch.zeros(1)
    report = load_weights(m, state, drop=["extra."], allow_missing=["b.*.LayerNorm", "b.1."])
    assert report.ignored == ["extra.weight"] and report.missing == ["b.1.bias", "b.1.weight"]
    with pytest.raises(CheckpointError, match=r"model keys are not in the checkpoint: \['b\.1\.bias'\]"):
        load_weights(m, state, drop=["extra."], allow_missing=["b.1.w"])
    assert load_weights(m, state, drop=["extra."], allow_missing=True).missing == ["b.1.bias", "b.1.weight"]
    loose = load_weights(m, state, strict=False)
    assert loose.unexpected == ["extra.weight"] and loose.missing and not loose.ok
    with pytest.raises(CheckpointError, match="shape mismatch"):  # never waived
        load_weights(m, {**state, "a.bias": torch.zeros(7)}, strict=False)


def test_prefix_patterns():
    assert matches("layers.3.llama_cross_attn.gate", ["layers.*.llama_cross_attn."])
    assert not matches("layers.3.self_attn.q_proj.weight", ["layers.*.llama_cross_attn."])
    assert matches("diffusion.unet.x", ["diffusion."]) and not matches("diffusionx", ["diffusion."])


def test_params_only_targets_parameters_and_check_only_copies_nothing():
    m = Small()
    with pytest.raises(CheckpointError, match=r"are not parameters of the model: \['table'\]"):
        load_weights(m, {"table": torch.ones(4)}, params_only=True)
    before = m.a.weight.detach().clone()
    new = torch.randn(2, 3)
    report = load_weights(m, {"a.weight": new}, params_only=True, allow_missing=True, check_only=True)
    assert report.loaded == ["a.weight"] and torch.equal(m.a.weight, before)
    load_weights(m, {"a.weight": new}, params_only=True, allow_missing=True)
    assert torch.equal(m.a.weight, new)


def test_partitioned_parameters_are_checked_by_their_real_shape():
    """Under DeepSpeed ZeRO-3 a parameter is an empty placeholder carrying `ds_shape`."""
    m = Small()
    with torch.no_grad():
        m.a.weight.data = torch.empty(0)
    m.a.weight.ds_shape = torch.Size([2, 3])
    load_weights(m, {"a.weight": torch.zeros(2, 3)}, params_only=True, allow_missing=True, check_only=True)
    with pytest.raises(CheckpointError, match=r"checkpoint \(3, 2\) vs model \(2, 3\)"):
        load_weights(m, {"a.weight": torch.zeros(3, 2)}, params_only=True, allow_missing=True, check_only=True)


def test_dtype_cast_meta_build_and_non_tensors():
    m = Small().to(torch.float64)
    state = fresh_state()
    load_weights(m, state)
    assert m.a.weight.dtype == torch.float64 and torch.equal(m.a.weight, state["a.weight"].double())
    with torch.device("meta"):
        meta = Small()
    load_weights(meta, state)
    assert not any(t.is_meta for t in meta.state_dict().values())
    assert torch.equal(meta.b[0].weight, state["b.0.weight"])
    with pytest.raises(CheckpointError, match=r"\['a\.bias'\] hold no tensor"):
        load_weights(Small(), {**state, "a.bias": [1.0, 2.0]})


def test_hf_llama_filter_and_rope_check(tmp_path):
    from transformers import LlamaForCausalLM

    cfg = tiny()
    model = DeemModel(cfg)
    hf_cfg = cfg.llm_config
    hf_cfg.vocab_size = cfg.base_vocab_size
    torch.manual_seed(0)
    state = LlamaForCausalLM(hf_cfg).state_dict()
    rope = model.llm.rotary_emb.inv_freq.clone()
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = rope  # older transformers saved it
    remapped, head = hf_llama_filter(state, model)
    assert remapped.ignored == ["model.layers.0.self_attn.rotary_emb.inv_freq"]
    assert torch.equal(head, state["lm_head.weight"])
    assert remapped.origin["layers.1.mlp.up_proj.weight"] == "model.layers.1.mlp.up_proj.weight"
    assert remapped.state["embed_tokens.weight"].shape[0] == cfg.text_vocab_size
    with pytest.raises(CheckpointError, match="another RoPE base"):
        hf_llama_filter({**state, "model.layers.0.self_attn.rotary_emb.inv_freq": rope * 1.5}, model)
    with pytest.raises(CheckpointError, match=r"not part of a LLaMA causal LM: \['vision_tower\.w'\]"):
        hf_llama_filter({**state, "vision_tower.w": torch.zeros(1)}, model)
    from safetensors.torch import save_file

    partial = {k: v.contiguous() for k, v in state.items() if "layers.1.mlp" not in k}
    save_file(partial, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"3 model keys .*layers\.1\.mlp\.down_proj\.weight.*lacks them") as e:
        load_llama(model, tmp_path)
    assert str(e.value).startswith(str(tmp_path))
