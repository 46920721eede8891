"""Sudoku evaluation: solve puzzles with the block-diffusion sampler or the autoregressive baseline, then score.

Scores follow the Hackable Diffusion recipe: exact-board solve rate, cell accuracy on the blanks, givens
preserved, plus the constraint-violation rate and the decoding cost (mean denoising steps / forwards and tokens
per forward), overall and by givens bucket (easy >= 40, medium 30-39, hard < 30). Used by the evaluate CLI,
the trainer's periodic evaluation and the notebook. A rule-checked best of N (restarts of the puzzles whose
answer breaks a rule, judged from the puzzle alone) is scored apart from the plain run, never mixed into it.
"""

from __future__ import annotations

import dataclasses
import time
import types
from typing import Callable, Iterable

import jax
import numpy as np

from diffusion_gemma.tasks.sudoku import puzzles as sudoku
from diffusion_gemma.tasks.sudoku.clamp import givens_clamp
from diffusion_gemma.tasks.sudoku.formats import SudokuFormat
from diffusion_gemma.sampling import autoregressive
from diffusion_gemma.sampling.sampler import SamplerConfig, StepEvent, generate, left_pad
from diffusion_gemma.model.transformer import DiffusionGemma

BUCKETS = ("easy", "medium", "hard")
DECODERS = ("diffusion", "autoregressive")
# The plain sampler of the reported Sudoku numbers (evaluate.py's defaults, the notebook): greedy, up to 64 steps,
# the confidence rule at 0.95, and the temperature falling from 2.0 to 1.0, which solved more boards of validation
# streams than the trainer's 0.8 -> 0.4 or any constant (experiments/sudoku/README.md, "Sampler temperature").
PLAIN_SAMPLER = types.MappingProxyType(dict(max_denoising_steps=64, greedy=True, acceptance="confidence",
                                            accept_confidence=0.95, t_min=1.0, t_max=2.0))


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


def _batches(prompts: list[list[int]], batch_size: int, pad_id: int, length: int | None = None
             ) -> Iterable[tuple[int, int, np.ndarray, np.ndarray]]:
    """(start, real rows, ids, mask): fixed-size batches (the last one padded by repeating its final prompt),
    every prompt left-padded to the longest of the whole set (or `length`), so one compiled program serves every
    batch (chat prompts differ in length with the puzzle's text)."""
    length = length or max(len(p) for p in prompts)
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
                    should_stop: Callable[[], bool] | None = None, clamp_givens: bool = False,
                    fixed_shape: tuple[int, int] | None = None) -> Answers:
    """Denoise every puzzle's answer with the block-diffusion sampler (row noise keyed by seed and batch).
    `on_batch(n)` is called after each batch with its number of real puzzles (a progress bar). `fixed_shape`:
    (batch size, prompt length) of every batch instead of what `puzzles` imply, so that solving a subset of a
    set again reuses the set's compiled program (`solve_best_of`). `clamp_givens`
    (compact format): the givens' answer cells are clamped, written in and never resampled.

    `should_stop()` (a training run's `StopSignal.check`) is asked after every batch, and in one process also
    after every denoising step, which ends the batch at once; True raises `Stopped`. Several processes ask only
    between batches: their answer is an agreement among the processes, made on the host, not inside the
    compiled sampler."""
    puzzles = np.asarray(puzzles).reshape(-1, 9, 9)
    prompts = _prompt_ids(fmt, puzzles)
    batch_size, length = fixed_shape or (min(batch_size, len(puzzles)), None)
    inside = should_stop if jax.process_count() == 1 else None
    boards, forwards, per_forward = [], [], []
    clamp_ids, clamp_mask = givens_clamp(fmt, puzzles, config.max_new_tokens) if clamp_givens else (None, None)
    for start, keep, ids, mask in _batches(prompts, batch_size, fmt.pad_id, length):
        rows = np.minimum(np.arange(start, start + len(ids)), len(puzzles) - 1)  # _batches' padding rows
        result = generate(model, ids, mask, jax.random.fold_in(jax.random.key(seed), start), config,
                          on_step=on_step, should_stop=inside,
                          clamp_ids=None if clamp_ids is None else clamp_ids[rows],
                          clamp_mask=None if clamp_mask is None else clamp_mask[rows])
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


# ------------------------------------------------------------------------------ rule-checked best of N
def follows_rules(puzzle, board) -> bool:
    """A complete board that breaks no Sudoku rule and keeps every given: decided from the puzzle alone, so a
    test-time selection may use it (it never sees a reference solution)."""
    return sudoku.validate(puzzle, board).is_solved


def rule_problems(puzzle, board) -> int:
    """Repeated digits in the units + changed givens + blank cells: 0 exactly when `follows_rules`. Ranks the
    answers of a puzzle none of whose attempts followed the rules (also from the puzzle alone)."""
    result = sudoku.validate(puzzle, board)
    return result.num_violations + result.num_changed_givens + int(np.sum(np.asarray(board) == 0))


@dataclasses.dataclass(frozen=True)
class BestOf:
    """What `best_of` kept: the chosen answers (forwards and tokens per forward over EVERY attempt a puzzle took,
    the real cost of the selection) and attempts [N], how many each puzzle used."""

    answers: Answers
    attempts: np.ndarray


def best_of(puzzles, first: Answers, retry: Callable[[np.ndarray, int], Answers], max_attempts: int) -> BestOf:
    """Rule-checked restarts. Starting from `first` (attempt 0, on every puzzle), every puzzle whose answer does
    not follow the rules is solved again, `retry(those puzzles [n, 9, 9], attempt)` for attempt 1, 2, ... up to
    `max_attempts` attempts in all, until it gets an answer that does; it keeps that answer, and when none of its
    attempts follows the rules, the one with the fewest `rule_problems` (the earliest on ties). The choice sees
    the puzzles and answers only, never a solution: this is a decoding strategy, not an oracle. The same choice
    as drawing `max_attempts` answers per puzzle and keeping the first that follows the rules, at the cost of
    the attempts actually needed."""
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
    puzzles = np.asarray(puzzles).reshape(-1, 9, 9)
    if len(first.boards) != len(puzzles):
        raise ValueError(f"{len(first.boards)} answers for {len(puzzles)} puzzles")
    boards = np.array(first.boards, copy=True)
    forwards = np.asarray(first.forwards, np.float64).copy()
    tokens = forwards * np.asarray(first.tokens_per_forward, np.float64)
    problems = np.array([rule_problems(p, b) for p, b in zip(puzzles, boards)])
    attempts = np.ones(len(puzzles), np.int64)
    for attempt in range(1, max_attempts):
        open_rows = np.flatnonzero(problems > 0)
        if not len(open_rows):
            break
        again = retry(puzzles[open_rows], attempt)
        if len(again.boards) != len(open_rows):
            raise ValueError(f"attempt {attempt}: {len(again.boards)} answers for {len(open_rows)} puzzles")
        for row, board, spent, per_forward in zip(open_rows, again.boards, again.forwards, again.tokens_per_forward):
            found = rule_problems(puzzles[row], board)
            if found < problems[row]:
                boards[row], problems[row] = board, found
            forwards[row] += spent
            tokens[row] += spent * per_forward
            attempts[row] += 1
    per_forward = np.divide(tokens, forwards, out=np.zeros_like(tokens), where=forwards > 0)
    return BestOf(Answers(boards, forwards, per_forward.astype(np.float32)), attempts)


def attempt_seed(seed: int, attempt: int) -> int:
    """The sampling seed of restart `attempt` (0: `seed` itself, so attempt 0 is the plain run), far from the
    neighbouring seeds a multi-seed study uses."""
    return seed + 1_000_003 * attempt


def solve_best_of(model: DiffusionGemma, puzzles, fmt: SudokuFormat, config: SamplerConfig, max_attempts: int, *,
                  first: Answers | None = None, batch_size: int = 64, seed: int = 0,
                  on_batch: Callable[[int], None] | None = None, **solve_options) -> BestOf:
    """`best_of` with the sampler: attempt a uses `attempt_seed(seed, a)`; `first` (the plain run's answers with
    the same settings) saves solving attempt 0 again. Restarts keep the whole set's batch and prompt shape, so
    they reuse its compiled program. `solve_options` go to every `solve_diffusion` call."""
    puzzles = np.asarray(puzzles).reshape(-1, 9, 9)
    shape = (min(batch_size, len(puzzles)), max(len(p) for p in _prompt_ids(fmt, puzzles)))

    def attempt(subset, index):
        return solve_diffusion(model, subset, fmt, config, seed=attempt_seed(seed, index), fixed_shape=shape,
                               on_batch=on_batch, **solve_options)

    return best_of(puzzles, attempt(puzzles, 0) if first is None else first, attempt, max_attempts)


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
                 on_batch: Callable[[int], None] | None = None, best_of_attempts: int = 1,
                 on_restart_batch: Callable[[int], None] | None = None) -> dict:
    """Solve and score one set: {count, seconds, report (by bucket), by_givens}. With `best_of_attempts` N > 1
    (diffusion only) also `best_of_N`: the same fields plus max_attempts and mean_attempts for `solve_best_of`'s
    choice (forwards summed over the attempts), whose attempt 0 is the plain run: the plain fields are exactly
    those without it. `on_restart_batch` is `on_batch` for the restarts."""
    if best_of_attempts > 1 and decoder != "diffusion":
        raise ValueError(f"best of {best_of_attempts} needs the diffusion decoder: {decoder} decoding is "
                         "deterministic, every attempt would give the same answer")
    began = time.perf_counter()
    answers = solve(model, puzzles, fmt, decoder, sampler, batch_size=batch_size, seed=seed, on_batch=on_batch)
    seconds = time.perf_counter() - began
    rows = puzzle_scores(puzzles, answers, solutions)
    result = dict(count=len(rows), seconds=seconds, report=bucket_report(rows), by_givens=by_givens(rows))
    if best_of_attempts > 1:
        sampler = sampler or sampler_config(fmt, model.config.canvas_length)
        chosen = solve_best_of(model, puzzles, fmt, sampler, best_of_attempts, first=answers, batch_size=batch_size,
                               seed=seed, on_batch=on_restart_batch)
        rows = puzzle_scores(puzzles, chosen.answers, solutions)
        result[f"best_of_{best_of_attempts}"] = dict(
            max_attempts=best_of_attempts, mean_attempts=float(np.mean(chosen.attempts)), count=len(rows),
            seconds=time.perf_counter() - began, report=bucket_report(rows), by_givens=by_givens(rows))
    return result
