"""The Sudoku experiment (main job of the toolkit).

Launch:  python -m diffusion_gemma.train --config=configs/sudoku.py [--config.model.preset=tiny]

Today (before the trainer lands) the command validates this config, builds the model it names and runs one
encode + decode forward pass; the training fields are added with the trainer.
"""

import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.variant = variant or "cpu"
    config.seed = 0
    config.model = ml_collections.ConfigDict()
    config.model.preset = "tiny"  # a ModelConfig classmethod: tiny | gemma4_26b_a4b
    config.model.dtype = "float32"
    config.model.param_dtype = "float32"
    config.data = ml_collections.ConfigDict()
    config.data.batch_size = 2
    config.data.prompt_length = 81
    return config
