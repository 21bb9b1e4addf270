"""Generation: a decoder's KV cache as planned state, and the greedy decoding loop over a
prefill program and a decode program (see decoding.py)."""
from .blocks import GOALS, BlockChoice, choose_block
from .decoding import GenerationStats, Generator, generate, plan_generation, plan_generator, run_blocks
from .hf_route import RoutedGenerate, route_generate

__all__ = ["generate", "Generator", "GenerationStats", "plan_generation", "plan_generator", "run_blocks",
           "choose_block", "BlockChoice", "GOALS", "route_generate", "RoutedGenerate"]
