"""Training metrics: a JSONL log and TensorBoard event files in the workdir, and the console progress bar.

Only replicated scalars reach the host (one `jax.device_get` of a small dict per logged step); only process 0
writes files.
"""

from __future__ import annotations

import json
import math
import os
from typing import Mapping

import jax

from diffusion_gemma import atomic_write

# bf16 matmul peak of common accelerators (dense, per chip), for the MFU estimate.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v5p": 459e12, "TPU v5 lite": 197e12,
              "TPU v4": 275e12, "TPU v6 lite": 918e12}


def device_peak_flops() -> float | None:
    kind = jax.devices()[0].device_kind
    for name, flops in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return flops * jax.device_count()
    return None


def train_flops_per_token(config, *, prompt_tokens: float, canvas_tokens: float, lora: bool) -> float:
    """Model FLOPs per optimizer-step token: 2 * active params per token and pass (encoder over the sequence,
    two decoder passes over the canvas, pass 1 forward only), x3 for backward where it applies (LoRA skips
    the weight gradients, ~x2). Attention scores are ignored (small at these lengths)."""
    active = active_params_per_token(config)
    backward = 2.0 if lora else 3.0
    per_sequence = 2 * active * (prompt_tokens * backward + canvas_tokens * (1 + backward))
    return per_sequence / max(prompt_tokens + canvas_tokens, 1)


def active_params_per_token(config) -> int:
    """The weights one token multiplies in one stack pass: attention, dense MLP, router, its top-k experts and the
    tied LM head (2 x this = forward FLOPs per token, the "6N" rule's N for training)."""
    d, experts = config.hidden_size, config.top_k * 3 * d_expert(config)
    attention = sum(d * config.num_heads * hd * 2 + d * kv * hd * (2 if t == "sliding_attention" else 1)
                    for t, hd, kv in config.layer_specs)
    dense = config.num_layers * (3 * d * config.intermediate_size + d * config.num_experts + experts)
    return attention + dense + d * config.vocab_size


def expert_params_per_token(config) -> int:
    """The routed experts' share of `active_params_per_token`: top_k experts' three matrices in every layer."""
    return config.num_layers * config.top_k * 3 * d_expert(config)


def d_expert(config) -> int:
    return config.hidden_size * config.moe_intermediate_size


class MetricsLogger:
    """Appends one JSON line per logged step to WORKDIR/metrics.jsonl and the same scalars to TensorBoard.

    `resume_step` is the step the run starts from (its restored checkpoint, or 0): what an interrupted run
    logged after it is dropped from both, since the resumed run logs those steps again, so every step keeps
    one line."""

    def __init__(self, workdir: str, *, resume_step: int = 0, enabled: bool = True):
        self.enabled = enabled and jax.process_index() == 0
        self.dropped = 0
        self._jsonl = None
        self._tensorboard = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            path = os.path.join(workdir, "metrics.jsonl")
            self.dropped = drop_lines_after(path, resume_step)
            self._jsonl = open(path, "a", buffering=1)
            from tensorboardX import SummaryWriter

            self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=resume_step + 1)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if math.isfinite(float(v)) else str(float(v))) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        for name, value in metrics.items():
            self._tensorboard.add_scalar(name, float(value), step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._tensorboard.close()


def drop_lines_after(path: str, step: int) -> int:
    """Rewrite the JSONL file at `path` (atomically: a temporary file renamed over it) without its records for
    steps after `step` and without lines that are not complete records (a run killed mid-write); returns how
    many lines went. A missing file, or one with nothing to drop, is left untouched."""
    if not os.path.exists(path):
        return 0
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    kept = [line for line in lines if _step_of(line) is not None and _step_of(line) <= step]
    if len(kept) == len(lines):
        return 0
    atomic_write.write_text(path, "".join(kept), overwrite=True)
    return len(lines) - len(kept)


def _step_of(line: str) -> int | None:
    if not line.endswith("\n"):
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record.get("step") if isinstance(record, dict) and isinstance(record.get("step"), int) else None
