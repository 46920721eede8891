"""Periodic evaluation during training: the sampler runs on the model being trained.

An evaluator is a callable `(model, step, should_stop) -> {name: float}`; the trainer calls it every
`evaluation.every_steps` steps and at the end, logs the values (prefixed `eval/`) with the training metrics
and prints a one-line summary. `should_stop` (the run's `StopSignal.check`, or None) lets a SIGTERM or Ctrl-C
abandon the evaluation within a denoising step: the evaluator then returns None. Kinds are looked up in
`diffusion_gemma.registry.EVALUATORS`; the core's own is
- `samples`: generate answers to fixed chat prompts; the texts go to WORKDIR/samples.jsonl, the decoding
  cost to the metrics.
Tasks register theirs (with their own `options`), e.g. solving held-out puzzles and scoring them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np

from diffusion_gemma import registry
from diffusion_gemma.sampling.sampler import ACCEPTANCE_RULES
from diffusion_gemma.model.transformer import DiffusionGemma

SAMPLES_FILE = "samples.jsonl"  # in the workdir, one line per prompt and evaluation
Evaluator = Callable[[DiffusionGemma, int, Optional[Callable[[], bool]]], Optional[dict]]


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvaluationConfig:
    """every_steps 0 disables evaluation. `kind`: a registered evaluator; `options` are its own settings (checked
    by it). `num_examples`, `batch_size` and `seed` size and fix a task's evaluation set; the sampler settings
    are every kind's. Samples: `prompts` (user turns, chat-rendered with data.tokenizer)."""

    every_steps: int = 0
    kind: str = "samples"
    num_examples: int = 64
    batch_size: int = 32
    seed: int = 1234
    max_denoising_steps: int = 32
    greedy: bool = False
    acceptance: str = "entropy_bound"  # the sampler's rule for which canvas tokens to keep each step
    accept_confidence: float = 0.9     # threshold of the "confidence" rule
    accept_margin: float = 0.9         # threshold of the "margin" rule (top-two probability margin)
    prompts: tuple[str, ...] = ()
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        registry.EVALUATORS.get(self.kind, where="evaluation.kind").check(dict(self.options),
                                                                         where="evaluation.options")
        if self.every_steps < 0 or self.num_examples <= 0 or self.batch_size <= 0:
            raise ValueError("evaluation.every_steps must be >= 0, num_examples and batch_size positive")
        if self.acceptance not in ACCEPTANCE_RULES:
            raise ValueError(f"evaluation.acceptance = {self.acceptance!r}; expected one of {ACCEPTANCE_RULES}")
        if self.every_steps and self.kind == "samples" and not self.prompts:
            raise ValueError("evaluation.kind = 'samples' needs evaluation.prompts")


def sampler_settings(config: EvaluationConfig) -> dict:
    return dict(max_denoising_steps=config.max_denoising_steps, greedy=config.greedy, acceptance=config.acceptance,
                accept_confidence=config.accept_confidence, accept_margin=config.accept_margin)


def make_evaluator(config: EvaluationConfig, data_config, tokenizer, workdir: str) -> Evaluator | None:
    if not config.every_steps:
        return None
    return registry.EVALUATORS.get(config.kind, where="evaluation.kind").build(config, data_config, tokenizer,
                                                                              workdir)


def _samples_evaluator(config: EvaluationConfig, data_config, tokenizer, workdir: str) -> Evaluator:
    if tokenizer is None:
        raise ValueError("evaluation.kind = 'samples' needs data.tokenizer")
    from diffusion_gemma.data.chat import user_prompt_ids
    from diffusion_gemma.sampling.sampler import SamplerConfig, generate, left_pad

    ids, mask = left_pad([user_prompt_ids(tokenizer, p) for p in config.prompts], tokenizer.pad_id)
    path = os.path.join(workdir, SAMPLES_FILE)

    def evaluate(model: DiffusionGemma, step: int, should_stop=None) -> dict | None:
        sampler = SamplerConfig(max_new_tokens=model.config.canvas_length,
                                **sampler_settings(config), eos_token_ids=(tokenizer.eos_id,),
                                pad_token_id=tokenizer.pad_id)
        inside = should_stop if jax.process_count() == 1 else None  # a stop is agreed between processes per step
        result = generate(model, ids, mask, jax.random.key(config.seed), sampler, should_stop=inside)
        if should_stop is not None and should_stop():
            return None
        if jax.process_index() == 0:
            with open(path, "a", encoding="utf-8") as f:
                for prompt, row in zip(config.prompts, result.generated()):
                    f.write(json.dumps({"step": step, "prompt": prompt, "text": tokenizer.decode(row)}) + "\n")
        return {"mean_forwards": float(np.mean(np.asarray(result.decoder_passes))),
                "mean_tokens_per_forward": float(np.mean(result.tokens_per_forward()))}

    return evaluate


registry.EVALUATORS.register("samples", registry.EvaluatorKind(build=_samples_evaluator))
