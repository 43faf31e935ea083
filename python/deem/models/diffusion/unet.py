"""Running a diffusers `UNet2DConditionModel` with the MMFSNet residuals (spec/model.md §8.3).

`run_unet` executes the UNet's own sub-modules (its `get_time_embed` helper, blocks and heads) and adds the
MMFSNet residuals where the original adds them: to the skip tensors and the mid-block output, after the mid
block and before the up path, exactly where diffusers adds ControlNet residuals. No monkey patches; the test
suite checks it against the UNet's own `forward`, which guards against diffusers drift (written against 0.42).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import UNet2DConditionModel

from deem.models.diffusion.mmfs_net import MMFSFeatures, MMFSNet


def check_unet_supported(unet: UNet2DConditionModel) -> None:
    cfg = unet.config
    unsupported = {
        "class_embed_type / num_class_embeds": unet.class_embedding is not None,
        "addition_embed_type": cfg.addition_embed_type is not None,
        "encoder_hid_dim_type": getattr(unet, "encoder_hid_proj", None) is not None,
        "time_cond_proj_dim": cfg.time_cond_proj_dim is not None,
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"run_unet supports text-conditioned UNets (SD 1.x/2.x); this UNet uses {', '.join(bad)}")


def run_unet(
    unet: UNet2DConditionModel,
    sample: torch.Tensor,
    timesteps: torch.Tensor | float | int,
    encoder_hidden_states: torch.Tensor,
    mmfs: MMFSNet | None = None,
    mmfs_features: Sequence[torch.Tensor] | MMFSFeatures | None = None,
    mmfs_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The UNet's prediction for `sample` [B, C, h, w] at `timesteps`, computed with the UNet's own
    sub-modules; the MMFSNet residuals are added to the skip tensors and the mid-block output after
    the mid block, before the up path (exactly like ControlNet residuals). With `mmfs` or
    `mmfs_features` None no residual is added and the result equals `unet(...).sample`."""
    check_unet_supported(unet)
    up_factor = 2**unet.num_upsamplers
    forward_upsample_size = any(d % up_factor != 0 for d in sample.shape[-2:])
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0

    emb = unet.time_embedding(unet.get_time_embed(sample, timesteps))
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)

    h = unet.conv_in(sample)
    skips: list[torch.Tensor] = [h]
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            h, res = block(hidden_states=h, temb=emb, encoder_hidden_states=encoder_hidden_states)
        else:
            h, res = block(hidden_states=h, temb=emb)
        skips.extend(res)

    if unet.mid_block is not None:
        if getattr(unet.mid_block, "has_cross_attention", False):
            h = unet.mid_block(h, emb, encoder_hidden_states=encoder_hidden_states)
        else:
            h = unet.mid_block(h, emb)

    if mmfs is not None and mmfs_features is not None:
        new_skips, h = mmfs(skips, h, mmfs_features, mmfs_mask)
        skips = list(new_skips)

    for i, block in enumerate(unet.up_blocks):
        n = len(block.resnets)
        res, skips = tuple(skips[-n:]), skips[:-n]
        upsample_size = skips[-1].shape[2:] if (forward_upsample_size and i < len(unet.up_blocks) - 1) else None
        if getattr(block, "has_cross_attention", False):
            h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=res,
                      encoder_hidden_states=encoder_hidden_states, upsample_size=upsample_size)
        else:
            h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=res, upsample_size=upsample_size)

    if unet.conv_norm_out is not None:
        h = unet.conv_act(unet.conv_norm_out(h))
    return unet.conv_out(h)

