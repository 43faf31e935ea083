"""Low-latency inference: the engine (static KV cache, per-request vision values, CUDA graphs of the decode step,
greedy / sampling / beam search on the device) and the `deem generate | chat | serve` front ends."""

from deem.infer.engine import InferenceEngine, TokenEvent, engine_for, release_engine
from deem.infer.inputs import ImagePreparer, Turn, chat_request, load_checkpoint
from deem.infer.request import Completion, GeneratedSequence, InferenceError, Request, SamplingParams


def generate_texts(model, *args, **kwargs):
    """`model.generate_texts(...)` decoded by the engine when `model` is a `DeemModel` (same arguments, same
    output: generated ids with the stop token, pad after it); any other model's own `generate_texts`."""
    from deem.models import DeemModel

    if isinstance(model, DeemModel):
        return engine_for(model).generate_ids(*args, **kwargs)
    return model.generate_texts(*args, **kwargs)


__all__ = ["Completion", "GeneratedSequence", "ImagePreparer", "InferenceEngine", "InferenceError", "Request",
           "SamplingParams", "TokenEvent", "Turn", "chat_request", "engine_for", "generate_texts", "load_checkpoint",
           "release_engine"]
