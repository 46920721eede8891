"""The numbers behind the Sudoku plots, without matplotlib: training curves from a workdir's metrics.jsonl,
sweep points and solve rate by givens from evaluation JSON documents (`runner.document`), and the frames of one
board being denoised (from the sampler's `on_step` events)."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

import numpy as np

from diffusion_gemma.tasks.sudoku.formats import CompactFormat, SudokuFormat
from diffusion_gemma.sampling.sampler import StepEvent

SOLVE_RATE = "solve_rate"


# ----------------------------------------------------------------------------------------- training curves
def read_metrics(workdir: str) -> list[dict]:
    """Every record of WORKDIR/metrics.jsonl. A last line without its newline (a run killed mid-write) is
    ignored; any other unreadable line is an error naming the file and line."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        raise ValueError(f"{path}: no metrics file (is {workdir} a training workdir?)")
    records = []
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if number == len(lines) and not line.endswith("\n"):
            break
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: invalid JSON ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ValueError(f"{path}:{number}: expected an object with an integer 'step'")
        records.append(record)
    return records


def training_curves(records: Sequence[dict], metric: str = SOLVE_RATE) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{'eval/solve_rate': (steps, values), 'eval/easy/solve_rate': ...}: every eval key ending in `metric`,
    sorted by step; a step logged twice (a resumed run) keeps its last value."""
    series: dict[str, dict[int, float]] = {}
    for record in records:
        for key, value in record.items():
            if key.startswith("eval/") and key.endswith(metric) and isinstance(value, (int, float)):
                series.setdefault(key, {})[record["step"]] = float(value)
    return {key: (np.array(sorted(points)), np.array([points[s] for s in sorted(points)]))
            for key, points in sorted(series.items())}


# ------------------------------------------------------------------------------------- evaluation documents
def read_documents(paths: Sequence[str]) -> list[dict]:
    docs = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
        if not isinstance(doc, dict) or "sets" not in doc or "decoder" not in doc:
            raise ValueError(f"{path}: not an evaluation result (expected the JSON that evaluate.py --output writes)")
        docs.append(dict(doc, path=path))
    return docs


@dataclasses.dataclass(frozen=True)
class SweepPoint:
    """One evaluation of one set: the diffusion sampler's settings (None for the autoregressive decoder) and
    what they gave."""

    set_name: str
    decoder: str
    steps: int | None
    entropy_bound: float | None
    early_stop: bool | None
    acceptance: str | None
    solve_rate: float
    mean_forwards: float


def sweep_points(docs: Sequence[dict]) -> list[SweepPoint]:
    points = []
    for doc in docs:
        sampler = doc.get("sampler") or {}
        for result in doc["sets"]:
            overall = result["report"]["all"]
            points.append(SweepPoint(set_name=result["name"], decoder=doc["decoder"],
                                     steps=sampler.get("max_denoising_steps"),
                                     entropy_bound=sampler.get("entropy_bound"),
                                     early_stop=sampler.get("early_stop"), acceptance=sampler.get("acceptance"),
                                     solve_rate=overall["solve_rate"], mean_forwards=overall["mean_forwards"]))
    return points


def solve_rate_by_givens(doc: dict) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """{set name: (givens, solve rate, count)} of one document."""
    out = {}
    for result in doc["sets"]:
        table = result.get("by_givens") or {}
        givens = sorted(int(n) for n in table)
        out[result["name"]] = (np.array(givens), np.array([table[str(n)][SOLVE_RATE] for n in givens]),
                               np.array([table[str(n)]["count"] for n in givens]))
    return out


def solve_rate_by_givens_per_decoder(docs: Sequence[dict]) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """{decoder: (givens, solve rate, count)}, pooling every set of every document with that decoder (e.g. one
    file per givens bucket): a givens count in several sets gets their count-weighted solve rate."""
    totals: dict[str, dict[int, list[float]]] = {}  # decoder -> givens -> [boards solved, boards]
    for doc in docs:
        for result in doc["sets"]:
            for givens, entry in (result.get("by_givens") or {}).items():
                total = totals.setdefault(doc["decoder"], {}).setdefault(int(givens), [0.0, 0])
                total[0] += entry[SOLVE_RATE] * entry["count"]
                total[1] += entry["count"]
    out = {}
    for decoder, table in totals.items():
        givens = sorted(table)
        solved, count = (np.array([table[g][k] for g in givens]) for k in (0, 1))
        out[decoder] = (np.array(givens), solved / count, count.astype(int))
    return out


# ------------------------------------------------------------------------------------------ denoising frames
@dataclasses.dataclass(frozen=True)
class Frame:
    """The answer board after one denoising step (the argmax of every canvas position, 0 = unreadable) and the
    cells whose token the step accepted (the others are renoised before the next step)."""

    block: int
    steps_remaining: int
    board: np.ndarray
    accepted: np.ndarray


def token_cells(fmt: SudokuFormat, ids: Sequence[int]) -> list[list[int]]:
    """For every answer token, the board cells its text fills (compact: token i is cell i; chat: the digits
    the token adds to the decoded text)."""
    ids = [int(i) for i in ids]
    if isinstance(fmt, CompactFormat):
        return [[i] if i < 81 else [] for i in range(len(ids))]
    stop = set(fmt.stop_ids) | {fmt.pad_id}
    cells, digits_before = [], 0
    for end in range(1, len(ids) + 1):
        if ids[end - 1] in stop or digits_before >= 81:
            cells += [[] for _ in range(len(ids) - end + 1)]
            break
        digits = sum(ch.isdigit() for ch in fmt.tokenizer.decode(ids[:end]))
        cells.append(list(range(digits_before, min(digits, 81))))
        digits_before = digits
    return cells


def frames_from_events(events: Sequence[StepEvent], fmt: SudokuFormat, row: int = 0) -> list[Frame]:
    """Row `row`'s boards step by step. Blocks before the current one contribute their last argmax canvas (what
    the sampler committed), the current block its argmax after the step."""
    frames, prefix, last_block, last_canvas = [], [], None, None
    for event in events:
        if last_block is not None and event.block != last_block:
            prefix += list(last_canvas)
        canvas = [int(t) for t in event.argmax[row]]
        ids = prefix + canvas
        accepted = np.zeros(81, bool)
        for position, cells in enumerate(token_cells(fmt, ids)):
            if position >= len(prefix) and event.accepted[row][position - len(prefix)]:
                accepted[cells] = True
        frames.append(Frame(event.block, event.steps_remaining, np.asarray(fmt.parse_answer(ids)).reshape(9, 9),
                            accepted.reshape(9, 9)))
        last_block, last_canvas = event.block, canvas
    return frames


def pick(frames: Sequence[Frame], count: int) -> list[Frame]:
    """At most `count` frames, evenly spaced, always keeping the first and the last."""
    if len(frames) <= count:
        return list(frames)
    index = np.unique(np.round(np.linspace(0, len(frames) - 1, count)).astype(int))
    return [frames[i] for i in index]
