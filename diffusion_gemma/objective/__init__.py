"""The block-diffusion SFT objective: corruption (noising), batching (clean batch -> training canvas),
self_conditioning (the two-pass rule), losses ((sum, count) terms and metrics) and randomness (per-example keys)
as pure JAX functions with frozen-dataclass settings; sft ties them together on the model, in forms the trainer
can jit and differentiate. The attention visibilities a canvas carries are `diffusion_gemma.model.masks`'.
"""

from diffusion_gemma.objective.batching import Canvas, SftBatch, choose_blocks, full_response_canvas, \
    selected_block_canvas
from diffusion_gemma.objective.corruption import ABSORBING, UNIFORM, Corruption, CorruptionSettings, corrupt
from diffusion_gemma.objective.losses import finalize_metrics
from diffusion_gemma.objective.sft import FULL_RESPONSE, SELECTED_BLOCK, Forward, LossCounts, LossSums, \
    ObjectiveSettings, denoise_canvas, forward, loss_counts, loss_fn, loss_sums, micro_batch_loss_fn, \
    model_loss_sums, prepare_canvas
from diffusion_gemma.objective.randomness import example_keys
from diffusion_gemma.objective.self_conditioning import sample_coins, two_pass_logits

__all__ = [
    "ABSORBING", "FULL_RESPONSE", "SELECTED_BLOCK", "UNIFORM", "Canvas", "Corruption", "CorruptionSettings",
    "Forward", "LossCounts", "LossSums", "ObjectiveSettings", "SftBatch", "choose_blocks", "corrupt",
    "denoise_canvas", "example_keys", "finalize_metrics", "forward", "full_response_canvas", "loss_counts",
    "loss_fn", "loss_sums", "micro_batch_loss_fn", "model_loss_sums", "prepare_canvas", "sample_coins",
    "selected_block_canvas", "two_pass_logits",
]
