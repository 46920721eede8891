"""The Sudoku plots: their numbers (metrics.jsonl curves, evaluation documents, denoising frames) and the PNGs
that experiments/sudoku/plots.py writes from them. No model runs here (test_sudoku_eval.py plots a real run's
training curve)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from diffusion_gemma.tasks.sudoku import puzzles as sudoku
from diffusion_gemma.tasks.sudoku.formats import ChatFormat, CompactFormat
from diffusion_gemma.data.tokenizer import load_tokenizer
from diffusion_gemma.sampling.sampler import StepEvent
from diffusion_gemma.tasks.sudoku import plot_data
from test_sudoku_eval import TINY_TOKENIZER, load_script

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def pair():
    return sudoku.generate_puzzle(np.random.default_rng(11), 36)


def test_training_curves_keep_the_last_value_of_a_step_and_skip_a_torn_line(tmp_path):
    lines = [{"step": 1, "loss": 3.0}, {"step": 2, "eval/solve_rate": 0.1, "eval/easy/solve_rate": 0.5},
             {"step": 4, "eval/solve_rate": 0.2}, {"step": 4, "eval/solve_rate": 0.25},  # resumed run
             {"step": 6, "eval/solve_rate": 0.4, "eval/easy/solve_rate": 0.9, "eval/easy/mean_forwards": 7.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 8, "ev')
    curves = plot_data.training_curves(plot_data.read_metrics(str(tmp_path)))
    assert list(curves) == ["eval/easy/solve_rate", "eval/solve_rate"]
    np.testing.assert_array_equal(curves["eval/solve_rate"][0], [2, 4, 6])
    np.testing.assert_allclose(curves["eval/solve_rate"][1], [0.1, 0.25, 0.4])
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{oops\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: invalid JSON"):
        plot_data.read_metrics(str(tmp_path))


def test_frames_follow_the_canvas_across_blocks(pair):
    puzzle, solution = pair
    fmt = CompactFormat()
    answer = np.array(fmt.answer_ids(solution))
    noisy = answer.copy()
    noisy[:40] = 3  # '0' digit: unreadable
    accepted = np.zeros(81, bool)
    accepted[50:] = True
    events = [StepEvent(0, 2, answer[None], noisy[None], accepted[None], np.array([False])),
              StepEvent(0, 1, answer[None], answer[None], np.ones((1, 81), bool), np.array([True]))]
    first, last = plot_data.frames_from_events(events, fmt)
    assert not first.board.reshape(-1)[:40].any() and np.array_equal(first.board.reshape(-1)[40:],
                                                                      solution.reshape(-1)[40:])
    assert first.accepted.reshape(-1).tolist() == accepted.tolist()
    np.testing.assert_array_equal(last.board, solution)
    many = [plot_data.Frame(0, n, first.board, first.accepted) for n in range(10, 0, -1)]
    assert [f.steps_remaining for f in plot_data.pick(many, 4)] == [10, 7, 4, 1]
    assert plot_data.pick(many[:3], 4) == many[:3]

    # Chat format over two 50-token blocks: the second block's cells come after the first block's digits.
    tokenizer = load_tokenizer(TINY_TOKENIZER)
    chat = ChatFormat(tokenizer)
    ids = chat.answer_ids(solution) + [tokenizer.eos_id] * 17  # 83 + 17 = two blocks of 50
    cells = plot_data.token_cells(chat, ids)
    assert cells[0] == [0] and cells[80] == [80] and cells[81] == [] and len(cells) == 100
    blocks = [np.array(ids[:50]), np.array(ids[50:])]
    events = [StepEvent(0, 1, blocks[0][None], blocks[0][None], np.ones((1, 50), bool), np.array([False])),
              StepEvent(1, 1, blocks[1][None], blocks[1][None], np.ones((1, 50), bool), np.array([True]))]
    frames = plot_data.frames_from_events(events, chat)
    assert frames[0].board.reshape(-1)[:50].tolist() == solution.reshape(-1)[:50].tolist()
    assert not frames[0].board.reshape(-1)[50:].any()
    np.testing.assert_array_equal(frames[1].board, solution)
    assert frames[1].accepted.reshape(-1).tolist() == [False] * 50 + [True] * 31


def _doc(decoder, steps=None, bound=0.1, early=True, rate=0.5, forwards=8.0, by_givens=None):
    sampler = None if decoder == "autoregressive" else dict(max_denoising_steps=steps, entropy_bound=bound,
                                                           early_stop=early, acceptance="entropy_bound")
    overall = dict(count=4, solve_rate=rate, mean_forwards=forwards)
    return dict(decoder=decoder, sampler=sampler,
                sets=[dict(name="eval.txt", report={"all": overall}, by_givens=by_givens or {})])


def test_sweep_and_givens_plots_from_evaluation_documents(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="the plots need the optional 'plots' extra (matplotlib)")
    plots = load_script("plots")
    paths = []
    for i, doc in enumerate([_doc("diffusion", 8, rate=0.2, forwards=6), _doc("diffusion", 16, rate=0.4),
                             _doc("diffusion", 8, early=False, forwards=8), _doc("diffusion", 16, early=False),
                             _doc("autoregressive", rate=0.1, forwards=81,
                                  by_givens={"30": {"count": 2, "solve_rate": 0.0},
                                             "45": {"count": 2, "solve_rate": 0.5}})]):
        paths.append(str(tmp_path / f"r{i}.json"))
        json.dump(doc, open(paths[-1], "w"))
    points = plot_data.sweep_points(plot_data.read_documents(paths))
    assert [(p.steps, p.early_stop, p.solve_rate) for p in points[:2]] == [(8, True, 0.2), (16, True, 0.4)]
    assert points[-1].decoder == "autoregressive" and points[-1].steps is None
    series = plot_data.solve_rate_by_givens(json.load(open(paths[-1])))
    np.testing.assert_array_equal(series["eval.txt"][0], [30, 45])

    # --by_decoder pools the sets of several files per decoder, weighting a shared givens count by its boards
    bucket = _doc("autoregressive", by_givens={"45": {"count": 6, "solve_rate": 1.0},
                                               "50": {"count": 1, "solve_rate": 1.0}})
    pooled = plot_data.solve_rate_by_givens_per_decoder([json.load(open(paths[-1])), bucket])
    np.testing.assert_array_equal(pooled["autoregressive"][0], [30, 45, 50])
    np.testing.assert_allclose(pooled["autoregressive"][1], [0.0, (0.5 * 2 + 6) / 8, 1.0])
    np.testing.assert_array_equal(pooled["autoregressive"][2], [2, 8, 1])
    assert set(pooled) == {"autoregressive"}

    sweep_png, givens_png = str(tmp_path / "sweep.png"), str(tmp_path / "givens.png")
    assert plots.main(["plots", "sweep", f"--results={','.join(paths)}", f"--output={sweep_png}"]) == 0
    assert plots.main(["plots", "givens", f"--results={paths[-1]}", f"--output={givens_png}"]) == 0
    assert open(sweep_png, "rb").read(8) == PNG and open(givens_png, "rb").read(8) == PNG
    by_decoder_png = str(tmp_path / "by_decoder.png")
    assert plots.main(["plots", "givens", "--by_decoder", f"--results={paths[-1]},{paths[0]}",
                       f"--output={by_decoder_png}"]) == 0
    assert open(by_decoder_png, "rb").read(8) == PNG
    assert plots.main(["plots", "givens", f"--results={paths[-1]}", f"--output={givens_png}"]) == 1
    assert "pass --overwrite" in capsys.readouterr().err
    json.dump({"not": "a result"}, open(paths[0], "w"))
    assert plots.main(["plots", "sweep", f"--results={paths[0]}", f"--output={tmp_path / 'x.png'}"]) == 1
    assert "not an evaluation result" in capsys.readouterr().err
    assert plots.main(["plots", "nonsense", f"--output={tmp_path / 'x.png'}"]) == 2
    pngs = sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".png")
    assert pngs == ["by_decoder.png", "givens.png", "sweep.png"]


def test_denoising_figure_draws_one_panel_per_frame(pair, tmp_path):
    pytest.importorskip("matplotlib", reason="the plots need the optional 'plots' extra (matplotlib)")
    from diffusion_gemma.tasks.sudoku import plotting

    puzzle, solution = pair
    wrong = solution.copy()
    wrong[puzzle == 0] = wrong[puzzle == 0] % 9 + 1
    frames = [plot_data.Frame(0, 3, wrong, np.zeros((9, 9), bool)), plot_data.Frame(0, 1, solution,
                                                                                     np.ones((9, 9), bool))]
    figure = plotting.denoising(puzzle, solution, frames, columns=2)
    titles = [ax.get_title() for ax in figure.axes]
    blanks = int((puzzle == 0).sum())
    assert titles == [f"block 0, 3 steps left\n0/{blanks} blanks right",
                      f"block 0, 1 steps left\n{blanks}/{blanks} blanks right"]
    colours = {text.get_color() for text in figure.axes[0].texts}
    assert colours == {plotting.GIVEN, plotting.WRONG}
    path = str(tmp_path / "board.png")
    plotting.save(figure, path, overwrite=False)
    assert open(path, "rb").read(8) == PNG
