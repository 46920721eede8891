"""Flax NNX modules of the DiffusionGemma stack; the math lives in pure functions beside them."""
