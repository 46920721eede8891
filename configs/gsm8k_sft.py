"""Full SFT of DiffusionGemma 26B-A4B on GSM8K-style chat data (the NeMo reference recipe, docs/TRAINING.md §8).

  python -m diffusion_gemma.train --config=configs/gsm8k_sft.py --workdir=/tmp/gsm8k_sft \\
      --config.model.init_hf_dir=/path/to/diffusiongemma-26B-A4B-it --config.data.path=/path/to/train.jsonl \\
      --config.data.tokenizer=/path/to/diffusiongemma-26B-A4B-it

  python -m diffusion_gemma.train --config=configs/gsm8k_sft.py:tiny --workdir=/tmp/gsm8k_sft_tiny   # CPU, minutes

The `tiny` variant runs the same code path on the bundled 64-example chat file and tokenizer with the tiny model.
"""

import os

import ml_collections

HERE = os.path.dirname(os.path.abspath(__file__))


def reference(lora: bool) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 42
    config.num_steps = 800
    config.grad_accum_steps = 1
    config.log_every = 1
    config.freeze_router = True
    # Experts split over the 'expert' mesh axis (every device by default) and exchanged with all-to-all;
    # "expert_parallel_ragged" sends exactly the routed rows instead (GPU/TPU only).
    config.model = dict(preset="gemma4_26b_a4b", overrides={"moe_impl": "expert_parallel"}, dtype="bfloat16",
                        param_dtype="float32", remat="full", init_hf_dir="", init_checkpoint="")
    config.optimizer = dict(learning_rate=1.5e-4, end_learning_rate=1.5e-5, warmup_steps=25, b1=0.95, b2=0.99,
                            eps=1e-8, weight_decay=1e-4, clip_norm=1.0)
    config.lora = dict(enabled=lora, rank=16, alpha=32.0)
    config.data = dict(source="chat_jsonl", path="", tokenizer="", seq_length=1024, block_size=256,
                       global_batch_size=8, shuffle_seed=42)
    config.objective = dict(noise_eps=1e-3, self_conditioning_probability=0.5, ar_weight=1.0)
    config.mesh = dict(data=1, expert=-1)
    config.checkpoint = dict(every_steps=100, keep=3, async_save=True)
    return ml_collections.ConfigDict(config)


def tiny(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    config.num_steps = 60
    config.model.preset = "tiny"
    config.model.overrides = {"vocab_size": 512, "canvas_length": 32}
    config.model.dtype = "float32"
    config.model.remat = "none"
    config.optimizer.learning_rate = 3e-3
    config.optimizer.end_learning_rate = 3e-4
    config.optimizer.warmup_steps = 5
    config.data.path = os.path.join(HERE, "data", "tiny_chat.jsonl")
    config.data.tokenizer = os.path.join(HERE, "data", "tiny_tokenizer.json")
    config.data.seq_length = 96
    config.data.block_size = 32
    config.log_every = 5
    config.checkpoint.every_steps = 20
    return config


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    config = reference(lora=False)
    if variant == "tiny":
        return tiny(config)
    if variant:
        raise ValueError(f"unknown variant {variant!r} of configs/gsm8k_sft.py (valid: tiny)")
    return config
