"""Periodic evaluation during training: the sampler runs on the model being trained.

An evaluator is a callable `(model, step, should_stop) -> {name: float}`; the trainer calls it every
`evaluation.every_steps` steps and at the end, logs the values (prefixed `eval/`) with the training metrics
and prints a one-line summary. `should_stop` (the run's `StopSignal.check`, or None) lets a SIGTERM or Ctrl-C
abandon the evaluation within a denoising step: the evaluator then returns None. Two kinds:
- `sudoku`: solve held-out puzzles (the EVAL side of the split rule, fixed by seed) with the block-diffusion
  sampler and score them (solve rate, blank-cell accuracy, steps) overall and by givens bucket.
- `samples`: generate answers to fixed chat prompts; the texts go to WORKDIR/samples.jsonl, the decoding
  cost to the metrics.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Optional

import jax
import numpy as np

from diffusion_gemma.diffusion.sampler import ACCEPTANCE_RULES
from diffusion_gemma.model.transformer import DiffusionGemma

EVALUATION_KINDS = ("sudoku", "samples")
SAMPLES_FILE = "samples.jsonl"  # in the workdir, one line per prompt and evaluation
Evaluator = Callable[[DiffusionGemma, int, Optional[Callable[[], bool]]], Optional[dict]]


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvaluationConfig:
    """every_steps 0 disables evaluation. Sudoku: `num_examples` generated eval-split puzzles with
    `min_givens`..`max_givens` givens. Samples: `prompts` (user turns, chat-rendered with data.tokenizer)."""

    every_steps: int = 0
    kind: str = "sudoku"
    num_examples: int = 64
    batch_size: int = 32
    seed: int = 1234
    min_givens: int = 30
    max_givens: int = 50
    max_denoising_steps: int = 32
    greedy: bool = False
    acceptance: str = "entropy_bound"  # the sampler's rule for which canvas tokens to keep each step
    accept_confidence: float = 0.9     # threshold of the "confidence" rule
    prompts: tuple[str, ...] = ()

    def __post_init__(self):
        if self.kind not in EVALUATION_KINDS:
            raise ValueError(f"evaluation.kind = {self.kind!r}; expected one of {EVALUATION_KINDS}")
        if self.every_steps < 0 or self.num_examples <= 0 or self.batch_size <= 0:
            raise ValueError("evaluation.every_steps must be >= 0, num_examples and batch_size positive")
        if self.acceptance not in ACCEPTANCE_RULES:
            raise ValueError(f"evaluation.acceptance = {self.acceptance!r}; expected one of {ACCEPTANCE_RULES}")
        if self.every_steps and self.kind == "samples" and not self.prompts:
            raise ValueError("evaluation.kind = 'samples' needs evaluation.prompts")


def _sampler_settings(config: EvaluationConfig) -> dict:
    return dict(max_denoising_steps=config.max_denoising_steps, greedy=config.greedy, acceptance=config.acceptance,
                accept_confidence=config.accept_confidence)


def make_evaluator(config: EvaluationConfig, data_config, tokenizer, workdir: str) -> Evaluator | None:
    if not config.every_steps:
        return None
    if config.kind == "sudoku":
        return _sudoku_evaluator(config, data_config, tokenizer)
    if tokenizer is None:
        raise ValueError("evaluation.kind = 'samples' needs data.tokenizer")
    return _samples_evaluator(config, tokenizer, workdir)


def _sudoku_evaluator(config: EvaluationConfig, data_config, tokenizer) -> Evaluator:
    from diffusion_gemma.data.sudoku_format import make_format
    from diffusion_gemma.evaluation import sudoku as sudoku_eval

    fmt = make_format(data_config.sudoku_format, tokenizer)
    puzzles, solutions = sudoku_eval.eval_puzzles(config.num_examples, seed=config.seed,
                                                  min_givens=config.min_givens, max_givens=config.max_givens)

    def evaluate(model: DiffusionGemma, step: int, should_stop=None) -> dict | None:
        sampler = sudoku_eval.sampler_config(fmt, model.config.canvas_length,
                                             **_sampler_settings(config))
        try:
            answers = sudoku_eval.solve_diffusion(model, puzzles, fmt, sampler, batch_size=config.batch_size,
                                                  seed=config.seed, should_stop=should_stop)
        except sudoku_eval.Stopped:
            return None
        report = sudoku_eval.score(puzzles, answers, solutions)
        out = {}
        for bucket, values in report.items():
            prefix = "" if bucket == "all" else f"{bucket}/"
            for name in ("solve_rate", "blank_cell_accuracy", "mean_forwards"):
                out[f"{prefix}{name}"] = values[name]
        return out

    return evaluate


def _samples_evaluator(config: EvaluationConfig, tokenizer, workdir: str) -> Evaluator:
    from diffusion_gemma.data.tokenizer import chat_prompt_ids
    from diffusion_gemma.diffusion.sampler import SamplerConfig, generate, left_pad

    ids, mask = left_pad([chat_prompt_ids(tokenizer, p) for p in config.prompts], tokenizer.pad_id)
    path = os.path.join(workdir, SAMPLES_FILE)

    def evaluate(model: DiffusionGemma, step: int, should_stop=None) -> dict | None:
        sampler = SamplerConfig(max_new_tokens=model.config.canvas_length,
                                **_sampler_settings(config), eos_token_ids=(tokenizer.eos_id,),
                                pad_token_id=tokenizer.pad_id)
        inside = should_stop if jax.process_count() == 1 else None  # as in sudoku_eval.solve_diffusion
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
