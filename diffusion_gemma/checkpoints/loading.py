"""Load a model for inference (evaluation, `generate`), wherever it comes from: a HuggingFace directory, one of
our Orbax checkpoints, or a training workdir's `checkpoints/` (latest step), LoRA adapters included.

Inference runs the plain model on one device: adapters are merged into their kernels (`orbax_io.load_model`),
and an expert-parallel MoE (which needs a mesh) is swapped for an implementation that gives the same outputs
without one. The files that travel with the weights come along: the tokenizer (a training run's own, else the
HF directory's) and the generation config.
"""

from __future__ import annotations

import dataclasses
import os

from diffusion_gemma.checkpoints import orbax_io
from diffusion_gemma.config import ModelConfig
from diffusion_gemma.data.tokenizer import find_tokenizer_file
from diffusion_gemma.sampling.sampler import GENERATION_CONFIG_FILE, SamplerConfig
from diffusion_gemma.model.transformer import DiffusionGemma

SINGLE_DEVICE_MOE = "grouped"


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """model; tokenizer: the tokenizer file shipped with the weights (`CheckpointDir.tokenizer_file`, or the HF
    directory's), None when there is none; generation_config: likewise its generation_config.json;
    merged_adapters: how many LoRA adapters were folded in."""

    model: DiffusionGemma
    tokenizer: str | None
    generation_config: str | None = None
    merged_adapters: int = 0

    def sampler_config(self) -> SamplerConfig:
        """The sampling defaults shipped with the model. Without EOS / pad ids in its generation config, the
        model config's are used so that answers end (the reference would then run to max_new_tokens)."""
        config = SamplerConfig.from_generation_config(self.generation_config or {})
        if not config.eos_token_ids:
            config = config.replace(eos_token_ids=self.model.config.eos_token_ids)
        if config.pad_token_id is None:
            config = config.replace(pad_token_id=self.model.config.pad_token_id)
        return config


def load(*, checkpoint: str | None = None, hf_dir: str | None = None, dtype: str = "float32",
         compute_dtype: str | None = None) -> LoadedModel:
    """Exactly one of `checkpoint` (ours, or a CheckpointManager root) and `hf_dir`; parameters in `dtype`,
    computations in `compute_dtype` (default: `dtype`)."""
    if (checkpoint is None) == (hf_dir is None):
        raise ValueError("give exactly one of checkpoint and hf_dir")
    if hf_dir is not None:
        from diffusion_gemma.checkpoints.hf import load_hf

        model = load_hf(hf_dir, dtype=dtype, compute_dtype=compute_dtype, moe_impl=SINGLE_DEVICE_MOE,
                        moe_capacity_factor=None)
        return LoadedModel(model, find_tokenizer_file(hf_dir) if os.path.isdir(hf_dir) else None,
                           _generation_config(hf_dir))
    ckpt = orbax_io.locate(checkpoint)
    config = single_device_config(orbax_io.read_model_config(ckpt), dtype, compute_dtype)
    merged = len(orbax_io.checkpoint_adapters(ckpt))
    model = orbax_io.load_model(checkpoint, config=config)
    return LoadedModel(model, ckpt.tokenizer_file(), _generation_config(ckpt.find(orbax_io.HF_SUBDIR)), merged)


def single_device_config(config: ModelConfig, dtype: str, compute_dtype: str | None = None) -> ModelConfig:
    moe = config.moe_impl if not config.moe_impl.startswith("expert_parallel") else SINGLE_DEVICE_MOE
    return config.replace(param_dtype=dtype, dtype=compute_dtype or dtype, moe_impl=moe, moe_capacity_factor=None,
                          remat="none")


def _generation_config(directory: str | None) -> str | None:
    path = os.path.join(directory, GENERATION_CONFIG_FILE) if directory else None
    return path if path and os.path.isfile(path) else None
