"""Matplotlib figures of the Sudoku experiment (the optional `plots` extra: pip install -e ".[plots]").

Each function takes the numbers from `plot_data` and returns a Figure; `save` writes it as a PNG atomically.
Only matplotlib's object API and the Agg backend are used (no pyplot state, no display needed).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from diffusion_gemma.tasks.sudoku import puzzles
from diffusion_gemma import atomic_write
from diffusion_gemma.tasks.sudoku.plot_data import Frame, SweepPoint

GIVEN, CORRECT, WRONG = "black", "#1a9641", "#d7191c"


def _figure(width: float, height: float):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("the Sudoku plots need matplotlib: pip install -e \".[plots]\"") from None
    return Figure(figsize=(width, height), layout="constrained")


def save(figure, path: str, *, overwrite: bool, dpi: int = 120) -> None:
    with atomic_write.atomic_path(path, overwrite=overwrite) as tmp:
        figure.savefig(tmp, format="png", dpi=dpi)


def training_curves(curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str = "",
                    metric: str = "solve_rate"):
    """A held-out metric (default: solve rate) vs training step, one line per key (overall bold)."""
    figure = _figure(6.4, 4.0)
    ax = figure.add_subplot()
    for key, (steps, values) in curves.items():
        label = key.removeprefix("eval/").removesuffix(metric).strip("/") or "all"
        ax.plot(steps, values, marker="o", markersize=3, linewidth=2.5 if label == "all" else 1.2, label=label)
    name = metric.replace("_", " ")
    limits = (-0.02, 1.02) if metric != "mean_forwards" else (0, None)
    ax.set(xlabel="training step", ylabel=name, ylim=limits, title=title or f"held-out {name}")
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(title="givens bucket")
    return figure


def sweep(points: Sequence[SweepPoint], title: str = ""):
    """Solve rate and decoder forwards vs the denoising step budget: one line per (entropy bound, early stop);
    solid = early stopping, dashed = fixed step count; the autoregressive baseline as a dotted level."""
    figure = _figure(10.0, 4.0)
    rate_ax, cost_ax = figure.subplots(1, 2)
    diffusion = [p for p in points if p.decoder == "diffusion"]
    groups: dict[tuple, list[SweepPoint]] = {}
    for p in diffusion:
        groups.setdefault((p.set_name, p.acceptance, p.entropy_bound, p.early_stop), []).append(p)
    for (set_name, acceptance, bound, early), members in sorted(groups.items(), key=lambda kv: str(kv[0])):
        members = sorted(members, key=lambda p: p.steps)
        steps = [p.steps for p in members]
        rule = f"bound {bound:g}" if acceptance == "entropy_bound" else acceptance
        label = f"{rule}, {'early stop' if early else 'fixed steps'}"
        if len({p.set_name for p in diffusion}) > 1:
            label = f"{set_name}: {label}"
        style = "-" if early else "--"
        line, = rate_ax.plot(steps, [p.solve_rate for p in members], style, marker="o", label=label)
        cost_ax.plot(steps, [p.mean_forwards for p in members], style, marker="o", color=line.get_color())
    for p in points:
        if p.decoder == "autoregressive":
            rate_ax.axhline(p.solve_rate, linestyle=":", color="grey", label=f"autoregressive ({p.set_name})")
    ticks = sorted({p.steps for p in diffusion})
    for ax in (rate_ax, cost_ax):
        ax.set_xscale("log", base=2)
        if ticks:
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.minorticks_off()
        ax.set_xlabel("denoising step budget per canvas")
        ax.grid(alpha=0.3)
    rate_ax.set(ylabel="solve rate", ylim=(-0.02, 1.02), title=title or "solve rate vs denoising steps")
    cost_ax.set(ylabel="mean decoder forwards per answer", title="cost")
    if points:
        rate_ax.legend(fontsize="small")
    return figure


def by_givens(series: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], title: str = ""):
    """Solve rate by number of givens (marker area ~ puzzles), the difficulty buckets shaded."""
    figure = _figure(6.4, 4.0 + 0.2 * len(series))  # room for the legend below the axes
    ax = figure.add_subplot()
    ax.axvspan(0, puzzles.MEDIUM_MIN_GIVENS - 0.5, color="#fde0dd", alpha=0.5, label="hard")
    ax.axvspan(puzzles.MEDIUM_MIN_GIVENS - 0.5, puzzles.EASY_MIN_GIVENS - 0.5, color="#fff7bc", alpha=0.5,
               label="medium")
    ax.axvspan(puzzles.EASY_MIN_GIVENS - 0.5, 81, color="#e5f5e0", alpha=0.5, label="easy")
    low, high = 81, 0
    for name, (givens, rates, counts) in series.items():
        if not len(givens):
            continue
        line, = ax.plot(givens, rates, linewidth=1)
        ax.scatter(givens, rates, s=12 + 60 * counts / max(1, counts.max()), color=line.get_color(),
                   label=os.path.basename(name))
        low, high = min(low, givens.min()), max(high, givens.max())
    ax.set_xlim(low - 1 if high else 17, high + 1 if high else 81)
    ax.set(xlabel="givens", ylabel="solve rate", ylim=(-0.02, 1.02), title=title or "solve rate by givens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)  # off the data
    return figure


def draw_board(ax, puzzle: np.ndarray, board: np.ndarray, solution: np.ndarray | None,
               accepted: np.ndarray | None = None, title: str = "") -> None:
    """Givens in black; other cells green when right, red when wrong; cells not accepted at this step faded."""
    ax.set_xlim(0, 9)
    ax.set_ylim(0, 9)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    for k in range(10):
        width = 1.6 if k % 3 == 0 else 0.4
        ax.axhline(k, color="black", linewidth=width)
        ax.axvline(k, color="black", linewidth=width)
    for r in range(9):
        for c in range(9):
            value = int(board[r, c])
            given = bool(puzzle[r, c])
            if given:
                value, color, alpha = int(puzzle[r, c]), GIVEN, 1.0
            elif not value:
                continue
            else:
                right = solution is not None and value == int(solution[r, c])
                color = CORRECT if right else WRONG
                alpha = 1.0 if accepted is None or accepted[r, c] else 0.3
            ax.text(c + 0.5, 8.5 - r, str(value), ha="center", va="center", fontsize=8, color=color, alpha=alpha,
                    fontweight="bold" if given else "normal")
    if title:
        ax.set_title(title, fontsize=8)


def denoising(puzzle: np.ndarray, solution: np.ndarray | None, frames: Sequence[Frame], columns: int = 4,
              title: str = ""):
    """A grid of boards, one per frame (see `draw_board` for the colours)."""
    rows = max(1, -(-len(frames) // columns))
    figure = _figure(2.2 * columns, 2.3 * rows + 0.4)
    axes = np.atleast_1d(figure.subplots(rows, columns)).reshape(-1)
    for ax, frame in zip(axes, frames):
        right = int(np.sum((frame.board == solution) & (puzzle == 0))) if solution is not None else 0
        blanks = int(np.sum(puzzle == 0))
        draw_board(ax, puzzle, frame.board, solution, frame.accepted,
                   f"block {frame.block}, {frame.steps_remaining} steps left\n{right}/{blanks} blanks right")
    for ax in axes[len(frames):]:
        ax.set_axis_off()
    figure.suptitle(title or "denoising one board (green right, red wrong, faded: not accepted this step)",
                    fontsize=9)
    return figure
