"""DEEM data layer: tokenizers and special tokens, readers for every on-disk format, dual-view transforms,
collators producing the model's inputs, pre-training streams, and the synthetic shapes world.

Entry points: `build_dataset(cfg)`, `build_collator(cfg, tokenizer)`, `load_tokenizer(cfg)`, `load_data_config(path)`,
`load_llama_tokenizer(path)`, `build_tiny_tokenizer(corpus)`, `synth_world(out_dir)`, `inspect(config)`.
"""

from deem.data.cli import add_data_commands, inspect
from deem.data.config import load_data_config
from deem.data.errors import BadSampleTracker, DataError, SampleError, TooManyBadSamples
from deem.data.images import DualViewTransform
from deem.data.registry import MixtureDataset, build_collator, build_dataset
from deem.data.synth import synth_world
from deem.data.tokenizer import (
    DeemTokenizer,
    SpecialTokens,
    build_tiny_tokenizer,
    load_llama_tokenizer,
    load_tokenizer,
)

__all__ = [
    "BadSampleTracker",
    "DataError",
    "DeemTokenizer",
    "DualViewTransform",
    "MixtureDataset",
    "SampleError",
    "SpecialTokens",
    "TooManyBadSamples",
    "add_data_commands",
    "build_collator",
    "build_dataset",
    "build_tiny_tokenizer",
    "inspect",
    "load_data_config",
    "load_llama_tokenizer",
    "load_tokenizer",
    "synth_world",
]
