"""diffusion_gemma: fine-tune and sample DiffusionGemma in JAX.

The small public API:
  ModelConfig        every architectural knob, presets `tiny()` and `gemma4_26b_a4b()`, HF config.json I/O
  DiffusionGemma     the Flax NNX stack: `encode` -> KVCache, `decode` -> canvas logits, `__call__` = both
  KVCache            the fixed-shape per-layer encoder cache
  load_hf            read a HuggingFace DiffusionGemma directory into a model
"""

from diffusion_gemma.checkpoints.hf import load_hf
from diffusion_gemma.config import ConfigError, ModelConfig
from diffusion_gemma.model.transformer import DiffusionGemma, KVCache

__all__ = ["ConfigError", "DiffusionGemma", "KVCache", "ModelConfig", "load_hf"]
__version__ = "0.1.0"
