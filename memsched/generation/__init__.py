"""Generation: a decoder's KV cache as planned state, and the greedy decoding loop over a
prefill program and a decode program (see generate.py)."""
from .generate import GenerationStats, Generator, generate

__all__ = ["generate", "Generator", "GenerationStats"]
