"""Generation with `DeemModel` (spec/model.md §11, §9.4), kept out of the model file the way transformers keeps
`generate` in its `GenerationMixin`: text continuation through transformers' `generate`, option scoring by
log-likelihood, and image generation through the diffusion side's sampler."""

from __future__ import annotations

import copy

import torch
from transformers import GenerationConfig, LlamaForCausalLM

from deem.models.diffusion import pack_mmfs_features, sample_images
from deem.models.llm import VisionContext
from deem.models.multimodal import previous_image_features
from deem.models.visual_tokenizer import VisualTokens


class _GenerationLM(LlamaForCausalLM):
    """transformers' causal-LM wrapper over our LLM and text head for `generate`; declares `vision_context`
    so generate forwards it to the model at every step, and `position_ids` so that generate derives them from
    the attention mask (left-padded prompts: cumsum(mask) - 1, spec/model.md §6.2) instead of counting pads."""

    def forward(self, *args, position_ids: torch.Tensor | None = None, vision_context: VisionContext | None = None,
                **kwargs):
        return super().forward(*args, position_ids=position_ids, vision_context=vision_context, **kwargs)


class GenerationMethods:
    """`generate_texts`, `generate_scores` and `generate_images` of `DeemModel` (which provides `_embed`,
    `_context_features`, `llm`, `text_head`, `image_decoder`, `diffusion` and `special`)."""

    def _causal_lm(self) -> LlamaForCausalLM:
        """A transformers causal LM over our LLM and text head, for `generate` (built once, not registered as
        a sub-module, so parameters are not listed twice)."""
        lm = self.__dict__.get("_generation_lm")
        if lm is None:
            stem = copy.deepcopy(self.llm.config)
            stem.num_hidden_layers = 0
            stem.vocab_size = 1
            lm = _GenerationLM(stem)
            lm.model = self.llm
            lm.lm_head = self.text_head
            lm.config = self.llm.config
            lm.eval()
            self.__dict__["_generation_lm"] = lm
        return lm

    @torch.no_grad()
    def generate_texts(
        self,
        text_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_tensors: torch.Tensor | None = None,
        num_image_per_seq: torch.Tensor | None = None,
        image_tensors_mask: torch.Tensor | None = None,
        max_new_tokens: int = 30,
        min_new_tokens: int = 8,
        num_beams: int = 5,
        length_penalty: float = 1.0,
        do_sample: bool = False,
        top_p: float = 0.9,
        temperature: float = 1.0,
        repetition_penalty: float = 1.0,
        num_return_sequences: int = 1,
        **_: object,
    ) -> torch.Tensor:
        """Continue left-padded prompts (spec/model.md §11.1): beam search (num_beams > 1) or greedy/sampling;
        stops on `</s>` or `<soi>`. Returns only the generated ids [B * num_return_sequences, T] (pad after the end)."""
        sp = self.special
        embeds, _, context = self._embed(text_ids, image_tensors, None, image_tensors_mask, num_image_per_seq, False)
        expand = num_beams if num_beams > 1 else num_return_sequences
        if context is not None:
            context = context.repeat_interleave(expand)
        gen = GenerationConfig(
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            num_beams=num_beams,
            length_penalty=length_penalty,
            do_sample=do_sample,
            top_p=top_p if do_sample else None,
            temperature=temperature if do_sample else None,
            repetition_penalty=repetition_penalty,
            num_return_sequences=num_return_sequences,
            eos_token_id=[sp["eos"], sp["soi"]],
            pad_token_id=sp["pad"],
            bos_token_id=sp["bos"],
            use_cache=True,
        )
        lm = self._causal_lm()
        return lm.generate(
            inputs_embeds=embeds, attention_mask=attention_mask, generation_config=gen, vision_context=context
        )

    @torch.no_grad()
    def generate_scores(
        self,
        context_ids: list[list[int]],
        options_ids: list[list[list[int]]],
        image_tensors: torch.Tensor | None = None,
        options_per_batch: int = 16,
    ) -> torch.Tensor:
        """Log-likelihood (sum over the option's tokens, no length normalisation) of every option after its
        context (spec/model.md §11.2). context_ids[i]: unpadded ids of sample i (its image tokens included when
        image_tensors has one image per sample); options_ids[i][k]: option k. The visual tokenizer runs once per
        sample; options are scored `options_per_batch` at a time. Returns [num_samples, max_options] (-inf where
        sample i has fewer options)."""
        sp = self.special
        device = self.soi_token.device
        n_opt = max(len(o) for o in options_ids)
        scores = torch.full((len(context_ids), n_opt), float("-inf"), device=device)
        for i, (ctx, options) in enumerate(zip(context_ids, options_ids)):
            visual = None
            if image_tensors is not None:
                visual = self.visual_tokenizer(image_tensors[i : i + 1])
            for first in range(0, len(options), options_per_batch):
                chunk = options[first : first + options_per_batch]
                seqs = [list(ctx) + list(opt) for opt in chunk]
                width = max(len(s) for s in seqs)
                ids = torch.full((len(seqs), width), sp["pad"], dtype=torch.long, device=device)
                att = torch.zeros_like(ids)
                for k, seq in enumerate(seqs):
                    ids[k, : len(seq)] = torch.tensor(seq, device=device)
                    att[k, : len(seq)] = 1
                per_seq = None
                repeated = None
                if visual is not None:
                    per_seq = torch.ones(len(seqs), dtype=torch.long, device=device)
                    repeated = VisualTokens(
                        visual.embeds.expand(len(seqs), -1, -1),
                        [m.expand(len(seqs), -1, -1, -1) for m in visual.multiscale],
                        None,
                    )
                embeds, _, context = self._embed(ids, None, None, None, per_seq, False, visual=repeated)
                hidden = self.llm(inputs_embeds=embeds, attention_mask=att, vision_context=context).last_hidden_state
                logp = self.text_head(hidden).float().log_softmax(-1)
                start = len(ctx)
                for k, opt in enumerate(chunk):
                    pos = torch.arange(start - 1, start - 1 + len(opt), device=device)
                    tok = torch.tensor(opt, device=device)
                    scores[i, first + k] = logp[k, pos, tok].sum()
        return scores

    @torch.no_grad()
    def generate_images(
        self,
        text_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_tensors: torch.Tensor,
        num_image_per_seq: torch.Tensor,
        target_image_idxs: list[int] | None = None,
        nearest_bos_idxs: torch.Tensor | None = None,
        num_inference_steps: int = 250,
        guidance_scale: float = 3.5,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Generate the images whose placeholders (a `<soi>` + image tokens, with any image tensor in
        `image_tensors`) appear in the prompt, conditioned on the text before each (spec/model.md §9.4).
        Returns [n_targets, 3, H, W] in [0, 1]."""
        if self.image_decoder is None:
            raise ValueError("this model has no image decoder (config.image_decoder_resampler is None)")
        embeds, vis, context = self._embed(text_ids, image_tensors, None, None, num_image_per_seq, False)
        hidden = self.llm(inputs_embeds=embeds, attention_mask=attention_mask, vision_context=context).last_hidden_state
        ctx, mask = self._context_features(hidden, text_ids, nearest_bos_idxs)
        cond = self.image_decoder(ctx, mask)
        prev, prev_mask = previous_image_features(vis.multiscale, text_ids, self.special["soi"], nearest_bos_idxs)
        idx = list(range(cond.shape[0])) if target_image_idxs is None else list(target_image_idxs)
        feats = pack_mmfs_features([p[idx] for p in prev])
        neg = self.image_decoder.neg_prompt_embeds.expand(len(idx), -1, -1)
        return sample_images(
            self.diffusion,
            cond[idx],
            neg,
            feats,
            prev_mask[idx],
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generator,
        )
