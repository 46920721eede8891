"""The block-diffusion SFT objective as pure JAX functions (no NNX state; settings are frozen dataclasses).

corruption (noising), masks (attention visibilities), batching (clean batch -> training canvas),
self_conditioning (the two-pass rule), losses ((sum, count) terms and metrics), objective (all of it tied
together, in forms the trainer can jit and differentiate), randomness (per-example keys).
"""

from diffusion_gemma.objective.batching import Canvas, SftBatch, choose_blocks, full_response_canvas, \
    selected_block_canvas
from diffusion_gemma.objective.corruption import ABSORBING, UNIFORM, Corruption, CorruptionSettings, corrupt
from diffusion_gemma.objective.losses import finalize_metrics
from diffusion_gemma.model.masks import encoder_visibility, inference_decoder_visibility, \
    training_decoder_visibility
from diffusion_gemma.objective.sft import FULL_RESPONSE, SELECTED_BLOCK, Forward, LossCounts, LossSums, \
    ObjectiveSettings, denoise_canvas, forward, freeze_router, loss_counts, loss_fn, loss_sums, \
    micro_batch_loss_fn, model_loss_sums, prepare_canvas
from diffusion_gemma.objective.randomness import example_keys
from diffusion_gemma.objective.self_conditioning import sample_coins, two_pass_logits

__all__ = [
    "ABSORBING", "FULL_RESPONSE", "SELECTED_BLOCK", "UNIFORM", "Canvas", "Corruption", "CorruptionSettings",
    "Forward", "LossCounts", "LossSums", "ObjectiveSettings", "SftBatch", "choose_blocks", "corrupt",
    "denoise_canvas", "encoder_visibility", "example_keys", "finalize_metrics", "forward", "freeze_router",
    "full_response_canvas", "inference_decoder_visibility", "loss_counts", "loss_fn", "loss_sums",
    "micro_batch_loss_fn", "model_loss_sums", "prepare_canvas", "sample_coins", "selected_block_canvas",
    "training_decoder_visibility", "two_pass_logits",
]
