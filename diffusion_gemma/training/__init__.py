"""Training: optimizer, LoRA, config, checkpointing, metrics, evaluation hook and the SFT loop."""
