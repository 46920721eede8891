"""`python -m diffusion_gemma.train --config=configs/sudoku.py`: the main job's entry point.

The SFT loop is not implemented yet. Today this CLI loads the ml_collections config, builds the model it
names, runs one encode + decode forward pass on random token ids and reports what it built.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from diffusion_gemma.config import ModelConfig
from diffusion_gemma.model.transformer import DiffusionGemma

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file (path.py[:variant]).",
                                          lock_config=True)
flags.mark_flags_as_required(["config"])


def model_config_from(config) -> ModelConfig:
    preset = getattr(ModelConfig, config.model.preset, None)
    if preset is None or not callable(preset):
        raise ValueError(f"config.model.preset = {config.model.preset!r} is not a ModelConfig preset "
                         "(tiny, gemma4_26b_a4b)")
    return preset(dtype=config.model.dtype, param_dtype=config.model.param_dtype)


def smoke_forward(config) -> dict:
    """Build the model and run one encode + decode on random ids; returns what was measured."""
    model_config = model_config_from(config)
    model = DiffusionGemma(model_config, rngs=nnx.Rngs(config.seed))
    params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    key_prompt, key_canvas = jax.random.split(jax.random.key(config.seed))
    batch = config.data.batch_size
    prompt = jax.random.randint(key_prompt, (batch, config.data.prompt_length), 0, model_config.vocab_size)
    canvas = jax.random.randint(key_canvas, (batch, model_config.canvas_length), 0, model_config.vocab_size)
    start = time.perf_counter()
    logits = nnx.jit(lambda m, p, c: m(p, c))(model, prompt, canvas)
    logits.block_until_ready()
    return {"parameters": params, "logits_shape": tuple(logits.shape), "finite": bool(jnp.isfinite(logits).all()),
            "seconds": time.perf_counter() - start}


def main(argv):
    del argv
    config = _CONFIG.value
    logging.info("jax %s on %s", jax.__version__, jax.devices())
    result = smoke_forward(config)
    print(f"built {config.model.preset!r}: {result['parameters']:,} parameters; one forward pass "
          f"-> logits {result['logits_shape']} (finite: {result['finite']}) in {result['seconds']:.1f}s")
    print("The SFT training loop is not implemented yet; this command only validated the config and the model.")


if __name__ == "__main__":
    app.run(main)
