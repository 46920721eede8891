"""diffusion_gemma: fine-tune and sample DiffusionGemma in JAX.

The small public API (imported lazily, so `diffusion_gemma.data` works without loading the model):
  ModelConfig        every architectural knob, presets `tiny()` and `gemma4_26b_a4b()` (HF config.json
                     conversion: `diffusion_gemma.checkpoints.hf_config`)
  DiffusionGemma     the Flax NNX stack: `encode` -> KVCache, `decode` -> canvas logits, `__call__` = both
  KVCache            the fixed-shape per-layer encoder cache
  load_hf            read a HuggingFace DiffusionGemma directory into a model
"""

import importlib

_PUBLIC = {
    "ConfigError": "diffusion_gemma.config",
    "ModelConfig": "diffusion_gemma.config",
    "DiffusionGemma": "diffusion_gemma.model.transformer",
    "KVCache": "diffusion_gemma.model.transformer",
    "load_hf": "diffusion_gemma.checkpoints.hf",
}

__all__ = sorted(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'diffusion_gemma' has no attribute {name!r}")
