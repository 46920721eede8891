"""LoRA SFT of DiffusionGemma 26B-A4B (rank 16, alpha 32 on attention q/k/v/o and the dense MLP;
docs/TRAINING.md §7-8).

  python -m diffusion_gemma.train --config=configs/gsm8k_lora.py --workdir=/tmp/gsm8k_lora \\
      --config.model.init_hf_dir=/path/to/diffusiongemma-26B-A4B-it --config.data.path=/path/to/train.jsonl \\
      --config.data.tokenizer=/path/to/diffusiongemma-26B-A4B-it

  python -m diffusion_gemma.train --config=configs/gsm8k_lora.py:tiny --workdir=/tmp/gsm8k_lora_tiny   # CPU
"""

import importlib.util
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def _sft_module():
    spec = importlib.util.spec_from_file_location("gsm8k_sft", os.path.join(HERE, "gsm8k_sft.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(variant: str = ""):
    sft = _sft_module()
    config = sft.reference(lora=True)
    if variant == "tiny":
        config = sft.tiny(config)
        config.num_steps = 80
        config.optimizer.learning_rate = 1e-2
        config.optimizer.end_learning_rate = 1e-3
        config.lora.rank = 8
        config.lora.alpha = 16.0
        return config
    if variant:
        raise ValueError(f"unknown variant {variant!r} of configs/gsm8k_lora.py (valid: tiny)")
    return config
