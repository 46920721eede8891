"""Sudoku evaluation: solve puzzles with the block-diffusion sampler or the autoregressive baseline, then score.

Scores follow the Hackable Diffusion recipe: exact-board solve rate, cell accuracy on the blanks, givens
preserved, plus the constraint-violation rate and the decoding cost (mean denoising steps / forwards and tokens
per forward), overall and by givens bucket (easy >= 40, medium 30-39, hard < 30). Used by the evaluate CLI,
the trainer's periodic evaluation and the notebook.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Iterable

import jax
import numpy as np

from diffusion_gemma.tasks.sudoku import puzzles as sudoku
from diffusion_gemma.tasks.sudoku.formats import SudokuFormat
from diffusion_gemma.sampling import autoregressive
from diffusion_gemma.sampling.sampler import SamplerConfig, StepEvent, generate, left_pad
from diffusion_gemma.model.transformer import DiffusionGemma

BUCKETS = ("easy", "medium", "hard")
DECODERS = ("diffusion", "autoregressive")


class Stopped(Exception):
    """`should_stop()` asked `solve_diffusion` to give up (a training run being stopped); nothing is scored."""


@dataclasses.dataclass(frozen=True)
class Answers:
    """The model's boards [N, 9, 9] (0 = unreadable cell), forwards [N] (denoising steps, or AR forwards) and
    tokens per forward [N]."""

    boards: np.ndarray
    forwards: np.ndarray
    tokens_per_forward: np.ndarray


def answer_length(fmt: SudokuFormat) -> int:
    """Tokens of the longest answer. Both formats give every solution the same length when each digit is one
    token, but a tokenizer may merge only some digits with their space: the longest of the nine one-digit
    boards bounds every board whose cells tokenize independently."""
    return max(len(fmt.answer_ids(np.full((9, 9), digit, np.int64))) for digit in range(1, 10))


def sampler_config(fmt: SudokuFormat, canvas_length: int, **overrides) -> SamplerConfig:
    """Enough blocks for the whole answer; the format's stop ids and pad. Defaults: 32 steps, entropy-bound
    acceptance, early stopping; `overrides` win."""
    blocks = -(-answer_length(fmt) // canvas_length)
    settings = dict(max_new_tokens=blocks * canvas_length, max_denoising_steps=32, eos_token_ids=fmt.stop_ids,
                    pad_token_id=fmt.pad_id)
    settings.update(overrides)
    return SamplerConfig(**settings)


def _batches(prompts: list[list[int]], batch_size: int, pad_id: int
             ) -> Iterable[tuple[int, int, np.ndarray, np.ndarray]]:
    """(start, real rows, ids, mask): fixed-size batches (the last one padded by repeating its final prompt),
    every prompt left-padded to the longest of the whole set, so one compiled program serves every batch (chat
    prompts differ in length with the puzzle's text)."""
    length = max(len(p) for p in prompts)
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start: start + batch_size]
        real = len(chunk)
        chunk = chunk + [chunk[-1]] * (batch_size - real)
        ids, mask = left_pad(chunk, pad_id, length)
        yield start, real, ids, mask


def _prompt_ids(fmt: SudokuFormat, puzzles: np.ndarray) -> list[list[int]]:
    if not len(puzzles):
        raise ValueError("no puzzles to solve")
    return [fmt.prompt_ids(p) for p in puzzles]


def solve_diffusion(model: DiffusionGemma, puzzles, fmt: SudokuFormat, config: SamplerConfig, *,
                    batch_size: int = 64, seed: int = 0,
                    on_step: Callable[[StepEvent], None] | None = None,
                    on_batch: Callable[[int], None] | None = None,
                    should_stop: Callable[[], bool] | None = None) -> Answers:
    """Denoise every puzzle's answer with the block-diffusion sampler (row noise keyed by seed and batch).
    `on_batch(n)` is called after each batch with its number of real puzzles (a progress bar).

    `should_stop()` (a training run's `StopSignal.check`) is asked after every batch, and in one process also
    after every denoising step, which ends the batch at once; True raises `Stopped`. Several processes ask only
    between batches: their answer is an agreement among the processes, made on the host, not inside the
    compiled sampler."""
    puzzles = np.asarray(puzzles).reshape(-1, 9, 9)
    prompts = _prompt_ids(fmt, puzzles)
    batch_size = min(batch_size, len(puzzles))
    inside = should_stop if jax.process_count() == 1 else None
    boards, forwards, per_forward = [], [], []
    for start, keep, ids, mask in _batches(prompts, batch_size, fmt.pad_id):
        result = generate(model, ids, mask, jax.random.fold_in(jax.random.key(seed), start), config,
                          on_step=on_step, should_stop=inside)
        if should_stop is not None and should_stop():
            raise Stopped(f"stopped after {start} of {len(puzzles)} puzzles")
        boards += [fmt.parse_answer(row) for row in result.generated()[:keep]]
        forwards.append(np.asarray(result.decoder_passes)[:keep])
        per_forward.append(result.tokens_per_forward()[:keep])
        if on_batch is not None:
            on_batch(keep)
    return Answers(np.stack(boards), np.concatenate(forwards), np.concatenate(per_forward))


def solve_autoregressive(model: DiffusionGemma, puzzles, fmt: SudokuFormat, *, batch_size: int = 64,
                         on_batch: Callable[[int], None] | None = None) -> Answers:
    """The baseline: greedy left-to-right decoding of the answer through the encoder's causal-LM path."""
    puzzles = np.asarray(puzzles).reshape(-1, 9, 9)
    prompts = _prompt_ids(fmt, puzzles)
    batch_size = min(batch_size, len(puzzles))
    length = answer_length(fmt)
    boards, forwards = [], []
    for _, keep, ids, mask in _batches(prompts, batch_size, fmt.pad_id):
        result = autoregressive.greedy_decode(model, ids, mask, max_new_tokens=length,
                                              eos_token_ids=fmt.stop_ids, pad_token_id=fmt.pad_id)
        boards += [fmt.parse_answer(row) for row in np.asarray(result.tokens)[:keep]]
        forwards.append(np.asarray(result.forwards)[:keep])
        if on_batch is not None:
            on_batch(keep)
    forwards = np.concatenate(forwards)
    return Answers(np.stack(boards), forwards, np.ones(len(forwards), np.float32))


def solve(model: DiffusionGemma, puzzles, fmt: SudokuFormat, decoder: str, sampler: SamplerConfig | None = None,
          *, batch_size: int = 64, seed: int = 0, on_batch: Callable[[int], None] | None = None) -> Answers:
    """`solve_diffusion` (with `sampler`, default `sampler_config`) or `solve_autoregressive` by name."""
    if decoder == "diffusion":
        sampler = sampler or sampler_config(fmt, model.config.canvas_length)
        return solve_diffusion(model, puzzles, fmt, sampler, batch_size=batch_size, seed=seed, on_batch=on_batch)
    if decoder == "autoregressive":
        return solve_autoregressive(model, puzzles, fmt, batch_size=batch_size, on_batch=on_batch)
    raise ValueError(f"decoder {decoder!r}; expected one of {DECODERS}")


def puzzle_scores(puzzles, answers: Answers, solutions=None) -> list[dict]:
    """One row per puzzle: bucket, givens, solved, blank-cell accuracy, violated, givens preserved, forwards and
    tokens per forward. Without reference `solutions` they are computed with the solver (a puzzle with several
    solutions then counts as solved whenever the answer is any valid completion)."""
    puzzles = np.asarray(puzzles).reshape(-1, 9, 9)
    if len(answers.boards) != len(puzzles):
        raise ValueError(f"{len(answers.boards)} answers for {len(puzzles)} puzzles")
    if solutions is None:
        solutions = [sudoku.solve(p) for p in puzzles]
    elif len(solutions) != len(puzzles):
        raise ValueError(f"{len(solutions)} solutions for {len(puzzles)} puzzles")
    rows = []
    for i, (puzzle, board) in enumerate(zip(puzzles, answers.boards)):
        reference = solutions[i]
        result = sudoku.validate(puzzle, board, reference)
        exact = bool(result.is_solved) if reference is None else bool(np.array_equal(board, reference)
                                                                        or result.is_solved)
        rows.append(dict(bucket=sudoku.givens_bucket(puzzle), givens=sudoku.num_givens(puzzle), solved=exact,
                         blank_accuracy=result.blank_accuracy, violated=result.num_violations > 0,
                         givens_preserved=result.givens_preserved, forwards=float(answers.forwards[i]),
                         tokens_per_forward=float(answers.tokens_per_forward[i])))
    return rows


def score(puzzles, answers: Answers, solutions=None) -> dict:
    """Scores overall ("all") and by bucket (only the buckets present); see `puzzle_scores`."""
    return bucket_report(puzzle_scores(puzzles, answers, solutions))


def bucket_report(rows: list[dict]) -> dict:
    report = {"all": _aggregate(rows)}
    for bucket in BUCKETS:
        subset = [r for r in rows if r["bucket"] == bucket]
        if subset:
            report[bucket] = _aggregate(subset)
    return report


def by_givens(rows: list[dict]) -> dict[int, dict]:
    """{number of givens: scores of the puzzles with that many}, sorted (the solve-rate-by-givens plot)."""
    return {n: _aggregate([r for r in rows if r["givens"] == n]) for n in sorted({r["givens"] for r in rows})}


def _aggregate(rows: list[dict]) -> dict:
    blank = [r["blank_accuracy"] for r in rows if r["blank_accuracy"] is not None]
    return dict(count=len(rows), solve_rate=float(np.mean([r["solved"] for r in rows])),
                blank_cell_accuracy=float(np.mean(blank)) if blank else float("nan"),
                violation_rate=float(np.mean([r["violated"] for r in rows])),
                givens_preserved_rate=float(np.mean([r["givens_preserved"] for r in rows])),
                mean_forwards=float(np.mean([r["forwards"] for r in rows])),
                mean_tokens_per_forward=float(np.mean([r["tokens_per_forward"] for r in rows])),
                mean_givens=float(np.mean([r["givens"] for r in rows])))


def format_table(report: dict, title: str = "") -> str:
    """A fixed-width table: one row per bucket present."""
    header = (f"{'bucket':<8}{'n':>6}{'solved':>9}{'blank acc':>11}{'violations':>12}{'givens kept':>13}"
              f"{'forwards':>10}{'tok/fwd':>9}")
    lines = ([title] if title else []) + [header, "-" * len(header)]
    for name in ("all",) + BUCKETS:
        if name in report:
            r = report[name]
            lines.append(f"{name:<8}{r['count']:>6}{r['solve_rate']:>9.1%}{r['blank_cell_accuracy']:>11.1%}"
                         f"{r['violation_rate']:>12.1%}{r['givens_preserved_rate']:>13.1%}"
                         f"{r['mean_forwards']:>10.1f}{r['mean_tokens_per_forward']:>9.2f}")
    return "\n".join(lines)


def eval_puzzles(num_puzzles: int, *, seed: int, min_givens: int, max_givens: int) -> tuple[np.ndarray, np.ndarray]:
    """Generated puzzles from the EVAL side of the split rule (never seen in training), deterministic by seed."""
    stream = sudoku.puzzle_stream(seed, min_givens, max_givens, split="eval")
    pairs = [next(stream) for _ in range(num_puzzles)]
    return np.stack([p for p, _ in pairs]), np.stack([s for _, s in pairs])


def evaluate_set(model: DiffusionGemma, puzzles, fmt: SudokuFormat, decoder: str,
                 sampler: SamplerConfig | None = None, *, solutions=None, batch_size: int = 64, seed: int = 0,
                 on_batch: Callable[[int], None] | None = None) -> dict:
    """Solve and score one set: {count, seconds, report (by bucket), by_givens}."""
    began = time.perf_counter()
    answers = solve(model, puzzles, fmt, decoder, sampler, batch_size=batch_size, seed=seed, on_batch=on_batch)
    seconds = time.perf_counter() - began
    rows = puzzle_scores(puzzles, answers, solutions)
    return dict(count=len(rows), seconds=seconds, report=bucket_report(rows), by_givens=by_givens(rows))
