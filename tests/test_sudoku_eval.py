"""Sudoku evaluation: prompt formats, the autoregressive baseline, scoring, puzzle files, the evaluate CLI, and a
tiny compact-format training run whose periodic evaluation and checkpoint are evaluated end to end.

Every model here has the same tiny shape (TINY_SUDOKU) and every decode the same batch (4 puzzles), so the
sampler and the greedy decoder compile once for the module."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffusion_gemma.checkpoints import orbax_io
from diffusion_gemma.data.pipeline import DataConfig
from diffusion_gemma.checkpoints.safetensors_dir import CheckpointError
from diffusion_gemma.config import ModelConfig
from diffusion_gemma.tasks.sudoku import puzzles as sudoku
from diffusion_gemma.tasks.sudoku.formats import (SYSTEM_PROMPT, ChatFormat, CompactFormat, check_vocabulary,
                                                default_format_name)
from diffusion_gemma.data.tokenizer import load_tokenizer
from diffusion_gemma.sampling import autoregressive
from diffusion_gemma.sampling.sampler import left_pad
from diffusion_gemma.tasks.sudoku import puzzle_sets
from diffusion_gemma.tasks.sudoku import evaluation as sudoku_eval
from diffusion_gemma.model.transformer import DiffusionGemma

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_TOKENIZER = os.path.join(REPO, "configs", "data", "tiny_tokenizer.json")
TINY_SUDOKU = dict(num_layers=1, hidden_size=32, intermediate_size=48, num_heads=2, head_dim=8, num_kv_heads=1,
                   global_head_dim=16, num_global_kv_heads=1, num_experts=8, top_k=2, moe_intermediate_size=16,
                   vocab_size=16, sliding_window=256, canvas_length=81)
BATCH = 4


def load_sudoku_config(variant: str = ""):
    """configs/sudoku.py's ConfigDict for `variant`, as the CLI's `--config=configs/sudoku.py:variant` loads it."""
    spec = importlib.util.spec_from_file_location("sudoku_config", os.path.join(REPO, "configs", "sudoku.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def load_script(name: str):
    """experiments/sudoku/<name>.py as a module (its flags live on their own FlagValues)."""
    spec = importlib.util.spec_from_file_location(f"sudoku_{name}_script",
                                                  os.path.join(REPO, "experiments", "sudoku", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pairs():
    """Six held-out puzzles with their solutions."""
    return sudoku_eval.eval_puzzles(6, seed=7, min_givens=28, max_givens=45)


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return load_tokenizer(TINY_TOKENIZER)


# ------------------------------------------------------------------------------------------------ formats
def test_compact_format_round_trip_and_garbled_cells(pairs):
    puzzles, solutions = pairs
    fmt = CompactFormat()
    prompt = fmt.prompt_ids(puzzles[0])
    assert prompt[0] == fmt.BOS and len(prompt) == 82 and fmt.stop_ids == (fmt.EOS,)
    assert [p - 3 for p in prompt[1:]] == puzzles[0].reshape(-1).tolist()
    answer = fmt.answer_ids(solutions[0])
    np.testing.assert_array_equal(fmt.parse_answer(answer), solutions[0])
    garbled = list(answer)
    garbled[5], garbled[9], garbled[80] = fmt.PAD, fmt.EOS, 3  # pad, eos and the '0' digit are no answer
    expected = solutions[0].reshape(-1).copy()
    expected[[5, 9, 80]] = 0
    np.testing.assert_array_equal(fmt.parse_answer(garbled).reshape(-1), expected)
    np.testing.assert_array_equal(fmt.parse_answer(answer[:40]).reshape(-1)[40:], 0)  # short: the rest blank
    assert sudoku_eval.answer_length(fmt) == 81


def test_chat_format_renders_the_recipe_prompt_and_round_trips(pairs, tiny_tokenizer):
    puzzles, solutions = pairs
    fmt = ChatFormat(tiny_tokenizer)
    text = tiny_tokenizer.decode(fmt.prompt_ids(puzzles[0]), skip_special_tokens=False)
    spaced = " ".join(str(d) for d in puzzles[0].reshape(-1))
    assert text == (f"<bos><|turn>system\n{SYSTEM_PROMPT}<turn|>\n<|turn>user\n{spaced}<turn|>\n<|turn>model\n")
    answer = fmt.answer_ids(solutions[0])
    assert tiny_tokenizer.decode(answer, skip_special_tokens=False) == ChatFormat.spaced(solutions[0]) + "<turn|>\n"
    np.testing.assert_array_equal(fmt.parse_answer(answer), solutions[0])
    assert fmt.stop_ids == (tiny_tokenizer.eos_id, tiny_tokenizer.require_id("<turn|>"))
    assert sudoku_eval.answer_length(fmt) == len(answer)


def test_chat_parse_of_messy_text(pairs, tiny_tokenizer):
    _, solutions = pairs
    fmt = ChatFormat(tiny_tokenizer)
    rows = ["".join(str(d) for d in row) for row in solutions[0]]
    messy = "Sure!\n" + "\n".join(f"| {r[:3]} | {r[3:6]} | {r[6:]} |" for r in rows) + "\nDone."
    ids = tiny_tokenizer.encode(messy) + [tiny_tokenizer.require_id("<turn|>")] + tiny_tokenizer.encode("1 2 3")
    np.testing.assert_array_equal(fmt.parse_answer(ids), solutions[0])  # digits after the turn end are ignored
    short = tiny_tokenizer.encode(" ".join(rows[0])) + [tiny_tokenizer.eos_id] + tiny_tokenizer.encode("5 5 5")
    board = fmt.parse_answer(short)
    np.testing.assert_array_equal(board[0], solutions[0][0])
    assert not board[1:].any()
    assert not fmt.parse_answer(tiny_tokenizer.encode("no digits here")).any()
    assert not fmt.parse_answer([tiny_tokenizer.pad_id] + fmt.answer_ids(solutions[0])).any()  # pad ends it


def test_format_choice_and_vocabulary_check(tiny_tokenizer):
    assert default_format_name(16) == "compact" and default_format_name(512) == "chat"
    check_vocabulary(CompactFormat(), 16)
    check_vocabulary(ChatFormat(tiny_tokenizer), tiny_tokenizer.vocab_size)
    with pytest.raises(ValueError, match=r"token id \d+, outside the model's vocabulary of 64"):
        check_vocabulary(ChatFormat(tiny_tokenizer), 64)


# ------------------------------------------------------------------------------------------------ scoring
@pytest.fixture(scope="module")
def graded_pairs():
    """One easy, one medium and one hard puzzle (by givens) with their solutions."""
    rng = np.random.default_rng(5)
    return [sudoku.generate_puzzle(rng, givens) for givens in (45, 33, 25)]


def _blank(puzzle):
    return [int(i) for i in np.flatnonzero(puzzle.reshape(-1) == 0)]


def test_score_exact_wrong_cell_changed_given_and_buckets(graded_pairs):
    puzzles = np.stack([p for p, _ in graded_pairs])
    solutions = np.stack([s for _, s in graded_pairs])
    exact = solutions[0].copy()
    wrong = solutions[1].copy().reshape(-1)
    cell = _blank(puzzles[1])[0]
    wrong[cell] = wrong[cell] % 9 + 1
    changed = solutions[2].copy().reshape(-1)
    given = int(np.flatnonzero(puzzles[2].reshape(-1))[0])
    changed[given] = changed[given] % 9 + 1
    answers = sudoku_eval.Answers(np.stack([exact, wrong.reshape(9, 9), changed.reshape(9, 9)]),
                                  forwards=np.array([4.0, 8.0, 12.0]), tokens_per_forward=np.array([20.0, 10.0, 5.0]))
    report = sudoku_eval.score(puzzles, answers, solutions)
    assert set(report) == {"all", "easy", "medium", "hard"}
    assert [report[b]["count"] for b in ("easy", "medium", "hard")] == [1, 1, 1]
    assert (report["easy"]["solve_rate"], report["medium"]["solve_rate"], report["hard"]["solve_rate"]) == (1, 0, 0)
    assert report["all"]["solve_rate"] == pytest.approx(1 / 3)
    blanks = len(_blank(puzzles[1]))
    assert report["medium"]["blank_cell_accuracy"] == pytest.approx((blanks - 1) / blanks)
    assert report["hard"]["blank_cell_accuracy"] == 1.0  # a changed given is not a blank
    assert (report["easy"]["violation_rate"], report["medium"]["violation_rate"]) == (0.0, 1.0)
    assert report["hard"]["givens_preserved_rate"] == 0.0 and report["medium"]["givens_preserved_rate"] == 1.0
    assert report["all"]["mean_forwards"] == 8.0 and report["all"]["mean_tokens_per_forward"] == pytest.approx(35 / 3)
    assert report["all"]["mean_givens"] == pytest.approx((45 + 33 + 25) / 3)
    # Without reference solutions the solver's are used: the same scores.
    assert sudoku_eval.score(puzzles, answers) == report
    rows = sudoku_eval.puzzle_scores(puzzles, answers, solutions)
    assert list(sudoku_eval.by_givens(rows)) == [25, 33, 45]
    table = sudoku_eval.format_table(report, "t")
    assert table.splitlines()[0] == "t" and "medium" in table and "100.0%" in table


def test_score_unreadable_board_and_mismatched_lengths(graded_pairs):
    puzzle, solution = graded_pairs[0]
    blank = sudoku_eval.Answers(np.zeros((1, 9, 9), np.int64), np.ones(1), np.ones(1))
    row = sudoku_eval.puzzle_scores(puzzle[None], blank, solution[None])[0]
    assert not row["solved"] and not row["violated"] and not row["givens_preserved"]
    assert row["blank_accuracy"] == 0.0
    with pytest.raises(ValueError, match="1 answers for 2 puzzles"):
        sudoku_eval.score(np.stack([puzzle, puzzle]), blank)


# -------------------------------------------------------------------------------------------- puzzle files
def test_nine_line_grids_and_solution_checks_name_file_and_line(tmp_path, pairs):
    puzzles, solutions = pairs
    path = tmp_path / "mixed.txt"
    path.write_text("# two 9-line grids, then one per line\n" + sudoku.format_grid(puzzles[0], "lines") + "\n\n"
                    + sudoku.format_grid(puzzles[1], "lines").replace("0", ".") + "\n"
                    + sudoku.format_grid(puzzles[2], "spaces") + "\n")
    assert [line for line, _ in sudoku.read_grids(path)] == [2, 12, 21]
    np.testing.assert_array_equal(sudoku.load_puzzles(path), puzzles[:3])
    partial = tmp_path / "partial.txt"
    partial.write_text("\n".join(sudoku.format_grid(puzzles[0], "lines").splitlines()[:4]) + "\n"
                       + sudoku.format_grid(puzzles[1], "compact") + "\n")
    with pytest.raises(ValueError, match=r"partial\.txt:1: a grid of 9 lines starts here but has 4 line\(s\)"):
        sudoku.load_puzzles(partial)

    good = tmp_path / "p.txt"
    good.write_text("".join(sudoku.format_grid(p, "compact") + "\n" for p in puzzles[:2]))
    sols = tmp_path / "s.txt"
    changed = solutions[1].copy()
    given = np.argwhere(puzzles[1])[0]
    changed[tuple(given)] = changed[tuple(given)] % 9 + 1
    sols.write_text(sudoku.format_grid(solutions[0], "compact") + "\n" + sudoku.format_grid(changed, "compact") + "\n")
    with pytest.raises(ValueError, match=r"s\.txt:2: the solution (breaks the Sudoku rules|changes)"):
        puzzle_sets.load_set(str(good), str(sols))
    sols.write_text(sudoku.format_grid(solutions[0], "compact") + "\n")
    with pytest.raises(ValueError, match=r"s\.txt: 1 solutions for the 2 puzzles"):
        puzzle_sets.load_set(str(good), str(sols))
    assert len(puzzle_sets.load_set(str(good), str(sols), limit=1)) == 1


def _without_solution(puzzle, solution):
    """`puzzle` with one blank filled by a digit that breaks no rule among the givens but is not the (unique)
    solution's: every solution of the result would solve `puzzle` too, so it has none."""
    filled = puzzle.copy()
    for row, col in np.argwhere(puzzle == 0):
        box = puzzle[row // 3 * 3: row // 3 * 3 + 3, col // 3 * 3: col // 3 * 3 + 3]
        seen = set(puzzle[row]) | set(puzzle[:, col]) | set(box.reshape(-1))
        free = [d for d in range(1, 10) if d not in seen and d != solution[row, col]]
        if free:
            filled[row, col] = free[0]
            return filled
    raise AssertionError("no blank with a free wrong digit")


def test_puzzle_files_are_checked_for_rule_breaking_unsolvable_and_ambiguous_puzzles(tmp_path, pairs):
    puzzles, solutions = pairs
    clash = puzzles[1].copy()
    row, col = np.argwhere(clash == 0)[0]
    clash[row, col] = clash[row][clash[row] > 0][0]  # a digit already given in that row
    several = np.zeros_like(puzzles[2])
    several.reshape(-1)[:10] = solutions[2].reshape(-1)[:10]  # 10 givens: far from unique
    unsolvable = _without_solution(puzzles[3], solutions[3])
    assert sudoku.count_solutions(unsolvable) == 0 and sudoku.validate(unsolvable, unsolvable).units_valid
    path = tmp_path / "p.txt"
    path.write_text("# a header line\n" + "".join(sudoku.format_grid(p, "compact") + "\n"
                                                  for p in (puzzles[0], clash, several, unsolvable)))
    digit = int(clash[row, col])
    with pytest.raises(puzzle_sets.InvalidPuzzleError) as err:
        puzzle_sets.load_set(str(path))
    assert str(err.value) == (f"{path}:3: the givens break the Sudoku rules: digit {digit} appears 2 times in row "
                              f"{row + 1} (and 2 more invalid puzzle(s) in the file)")
    loaded = puzzle_sets.load_set(str(path), allow_invalid=True)
    assert len(loaded) == 4 and [p.index for p in loaded.invalid] == [1, 2, 3]
    assert [p.problem.split(": ", 1)[1] for p in loaded.invalid[1:]] == [
        "the puzzle has more than one solution", "the puzzle has no solution"]
    assert [p.problem.split(":")[1] for p in loaded.invalid] == ["3", "4", "5"]
    assert puzzle_sets.load_set(str(path), limit=1).invalid == ()  # only the puzzles kept are checked

    # A listed solution of another puzzle: a valid grid that does not complete this one.
    good = tmp_path / "good.txt"
    good.write_text("".join(sudoku.format_grid(p, "compact") + "\n" for p in puzzles[:3]))
    sols = tmp_path / "s.txt"
    sols.write_text("".join(sudoku.format_grid(s, "compact") + "\n" for s in (solutions[0], solutions[0],
                                                                              solutions[2])))
    loaded = puzzle_sets.load_set(str(good), str(sols), allow_invalid=True)
    (problem,) = loaded.invalid
    assert problem.index == 1 and problem.problem.startswith(f"{sols}:2: the solution changes ")
    assert problem.problem.endswith(f" given(s) (puzzle {good}:2)")
    np.testing.assert_array_equal(loaded.solutions, solutions[:3])  # scored against the puzzle's own solution


@pytest.mark.parametrize("cells,expected", [
    ({(0, 0): 5, (0, 8): 5}, "digit 5 appears 2 times in row 1"),
    ({(1, 4): 7, (8, 4): 7, (5, 4): 7}, "digit 7 appears 3 times in column 5"),
    ({(3, 6): 2, (5, 8): 2}, "digit 2 appears 2 times in box 6"),
])
def test_rule_breaking_givens_are_named_by_unit(cells, expected):
    grid = np.zeros((9, 9), np.int8)
    for (row, col), digit in cells.items():
        grid[row, col] = digit
    assert puzzle_sets.puzzle_problem(grid) == f"the givens break the Sudoku rules: {expected}"


def test_merge_adapters_folds_stacked_and_plain_lora():
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(2, 3, 4)).astype(np.float32)  # 2 stacked layers of a [3, 4] kernel
    a, b = rng.normal(size=(2, 3, 2)).astype(np.float32), rng.normal(size=(2, 2, 4)).astype(np.float32)
    plain, pa, pb = (rng.normal(size=s).astype(np.float32) for s in ((5, 6), (5, 1), (1, 6)))
    values = {("blocks", "0", "q"): kernel, ("blocks", "0", "q_lora", "a"): a, ("blocks", "0", "q_lora", "b"): b,
              ("sc", "up"): plain, ("sc", "up_lora", "a"): pa, ("sc", "up_lora", "b"): pb}
    lora = {"blocks/0/q_lora": {"scale": 2.0, "batch_dims": 0}, "sc/up_lora": {"scale": 0.5, "batch_dims": 0}}
    assert orbax_io.merge_adapters(values, lora, where="ckpt") == 2
    assert set(values) == {("blocks", "0", "q"), ("sc", "up")}
    np.testing.assert_allclose(values[("blocks", "0", "q")], kernel + 2.0 * np.einsum("lir,lro->lio", a, b),
                               rtol=1e-6)
    np.testing.assert_allclose(values[("sc", "up")], plain + 0.5 * pa @ pb, rtol=1e-6)
    with pytest.raises(CheckpointError, match="no scale recorded for adapter 'x_lora'"):
        orbax_io.merge_adapters({("x",): plain, ("x_lora", "a"): pa, ("x_lora", "b"): pb}, {}, where="ckpt")


# ---------------------------------------------------------------------------------- the autoregressive baseline
def test_greedy_decode_equals_full_reencodes_and_stops_at_eos(pairs):
    puzzles, _ = pairs
    model = DiffusionGemma(ModelConfig.tiny(**TINY_SUDOKU), rngs=nnx.Rngs(3))
    fmt = CompactFormat()
    prompts = [fmt.prompt_ids(p) for p in puzzles[:BATCH]]
    prompts[1] = prompts[1][:60]  # one left-padded row
    ids, mask = left_pad(prompts, fmt.pad_id, 82)
    new = 81
    plain = autoregressive.greedy_decode(model, ids, mask, max_new_tokens=new)
    tokens = np.asarray(plain.tokens)
    assert tokens.shape == (BATCH, new) and np.all(np.asarray(plain.forwards) == new)

    graphdef, state = nnx.split(model)

    @jax.jit
    def last_logits(state, sequence, sequence_mask, position):
        m = nnx.merge(graphdef, state)
        _, hidden = m.encode(sequence, padding_mask=sequence_mask)
        return m.lm_logits(jax.lax.dynamic_index_in_dim(hidden, position, 1))[:, 0]

    sequence = np.concatenate([ids, np.zeros((BATCH, new), np.int32)], axis=1)
    sequence_mask = np.concatenate([mask, np.zeros((BATCH, new), bool)], axis=1)
    for i in range(new):  # the naive loop: re-encode everything, take the argmax of the last real position
        logits = last_logits(state, jnp.asarray(sequence), jnp.asarray(sequence_mask), 82 + i - 1)
        sequence[:, 82 + i] = np.argmax(np.asarray(logits), axis=-1)
        sequence_mask[:, 82 + i] = True
    np.testing.assert_array_equal(tokens, sequence[:, 82:])
    assert len(set(tokens.reshape(-1).tolist())) > 1, "degenerate model: the comparison would be weak"

    eos, pad = int(tokens[0, 5]), 15
    stopped = autoregressive.greedy_decode(model, ids, mask, max_new_tokens=new, eos_token_ids=(eos,),
                                           pad_token_id=pad)
    for row in range(BATCH):
        hits = np.flatnonzero(tokens[row] == eos)
        end = int(hits[0]) + 1 if len(hits) else new
        expected = np.concatenate([tokens[row, :end], np.full(new - end, pad)])
        np.testing.assert_array_equal(np.asarray(stopped.tokens)[row], expected)
        assert int(stopped.forwards[row]) == end
    assert int(stopped.forwards[0]) <= 6


# ------------------------------------------------------------------------------- training + evaluate CLI
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """configs/sudoku.py (compact format) shrunk to TINY_SUDOKU: 2 steps with the periodic evaluation on.

    Run once per session even under pytest-xdist (the tests using it may land on both workers): the first
    worker trains into the session's shared temp directory under a file lock, the other reuses the result."""
    import fcntl
    import types

    from diffusion_gemma.training.config import from_config_dict
    from diffusion_gemma.training.trainer import train

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # this session's directory, shared by its workers
    workdir, summary = str(root / "sudoku_run"), root / "sudoku_run.json"
    with open(root / "sudoku_run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not summary.exists():
            raw = load_sudoku_config("")
            raw.num_steps, raw.log_every = 2, 1
            raw.model.overrides = dict(TINY_SUDOKU)
            raw.data.update(global_batch_size=4, num_synthetic_examples=64)
            raw.checkpoint.update(every_steps=2, async_save=False)
            raw.evaluation.update(every_steps=2, num_examples=BATCH, batch_size=BATCH, max_denoising_steps=4)
            result = train(from_config_dict(raw), workdir, progress=False, devices=jax.devices()[:1])
            summary.write_text(json.dumps(dict(final_step=result.final_step, losses=result.losses,
                                               history=result.history)))
    return workdir, types.SimpleNamespace(**json.loads(summary.read_text()))


@pytest.mark.slow
def test_training_runs_the_periodic_sudoku_evaluation(trained):
    workdir, result = trained
    assert result.final_step == 2 and all(np.isfinite(result.losses))
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    evals = [r for r in records if "eval/solve_rate" in r]
    assert [r["step"] for r in evals] == [2]
    values = evals[0]
    for bucket in ("",) + tuple(f"{b}/" for b in sudoku_eval.BUCKETS if f"eval/{b}/solve_rate" in values):
        assert 0.0 <= values[f"eval/{bucket}solve_rate"] <= 1.0
        assert 0.0 <= values[f"eval/{bucket}blank_cell_accuracy"] <= 1.0
        # A 2-step model is never confident: every puzzle runs the whole 4-step budget.
        assert values[f"eval/{bucket}mean_forwards"] == 4.0
    assert any(key.count("/") == 2 for key in values)  # at least one bucket
    assert result.history[-1]["eval/solve_rate"] == values["eval/solve_rate"]


@pytest.fixture(scope="module")
def puzzle_files(tmp_path_factory, pairs):
    puzzles, solutions = pairs
    directory = tmp_path_factory.mktemp("puzzles")
    files = {"compact": directory / "compact.txt", "lines": directory / "lines.txt",
             "solutions": directory / "solutions.txt"}
    files["compact"].write_text("".join(sudoku.format_grid(p, "compact") + "\n" for p in puzzles))
    files["lines"].write_text("".join(sudoku.format_grid(p, "lines") + "\n\n" for p in puzzles[::-1]))
    files["solutions"].write_text("".join(sudoku.format_grid(s, "spaces") + "\n" for s in solutions))
    return {k: str(v) for k, v in files.items()}


@pytest.mark.slow
def test_evaluate_cli_diffusion_json_tables_and_overwrite(trained, puzzle_files, tmp_path, capsys):
    evaluate = load_script("evaluate")
    output = str(tmp_path / "eval.json")
    common = ["evaluate", f"--checkpoint={os.path.join(trained[0], 'checkpoints')}", "--limit=4", "--steps=4",
              f"--batch_size={BATCH}", "--noprogress", f"--output={output}"]
    # The reversed 9-line file with the forward solutions: refused before any model work, naming the line.
    mismatched = common + [f"--puzzles={puzzle_files['lines']}", f"--solutions={puzzle_files['solutions']}"]
    assert evaluate.main(mismatched) == 1
    assert f"{puzzle_files['solutions']}:1: the solution" in capsys.readouterr().err and not os.path.exists(output)
    two_for_one = common + [f"--puzzles={puzzle_files['compact']},{puzzle_files['lines']}",
                            f"--solutions={puzzle_files['solutions']}"]
    assert evaluate.main(two_for_one) == 2 and "one per puzzle file" in capsys.readouterr().err

    argv = common + [f"--puzzles={puzzle_files['compact']}", f"--solutions={puzzle_files['solutions']}"]
    assert evaluate.main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "compact.txt (diffusion" in printed and "bucket" in printed and f"wrote {output}" in printed
    doc = json.load(open(output))
    assert doc["format"] == "compact" and doc["decoder"] == "diffusion" and doc["limit"] == 4
    assert doc["model"]["vocab_size"] == 16 and doc["sampler"]["max_denoising_steps"] == 4
    assert doc["sampler"]["early_stop"] is True and doc["sampler"]["eos_token_ids"] == [CompactFormat.EOS]
    (result,) = doc["sets"]
    assert result["count"] == 4 and result["solutions"] == puzzle_files["solutions"]
    report = result["report"]
    assert set(report["all"]) == {"count", "solve_rate", "blank_cell_accuracy", "violation_rate",
                                  "givens_preserved_rate", "mean_forwards", "mean_tokens_per_forward", "mean_givens"}
    assert sum(report[b]["count"] for b in sudoku_eval.BUCKETS if b in report) == 4
    assert report["all"]["mean_forwards"] == 4.0  # a 2-step model is never confident enough to stop early
    assert sum(v["count"] for v in result["by_givens"].values()) == 4
    before = open(output).read()
    assert evaluate.main(argv) == 1  # the output exists
    assert "already exists; pass --overwrite" in capsys.readouterr().err and open(output).read() == before
    assert evaluate.main(argv + ["--overwrite", "--entropy_bound=0.5", "--greedy", "--noearly_stop"]) == 0
    again = json.load(open(output))
    assert again["sampler"]["entropy_bound"] == 0.5 and again["sampler"]["greedy"] is True
    assert again["sets"][0]["report"]["all"]["mean_forwards"] == 4.0  # no early stop: the whole budget


@pytest.mark.slow
def test_evaluate_cli_autoregressive_on_two_files(trained, puzzle_files, capsys):
    evaluate = load_script("evaluate")
    doc = evaluate.run(["evaluate", f"--checkpoint={os.path.join(trained[0], 'checkpoints')}",
                        f"--puzzles={puzzle_files['compact']},{puzzle_files['lines']}", "--limit=4",
                        "--decoder=autoregressive", f"--batch_size={BATCH}", "--noprogress"])
    assert doc["sampler"] is None and [s["count"] for s in doc["sets"]] == [4, 4]
    assert [s["name"] for s in doc["sets"]] == [puzzle_files["compact"], puzzle_files["lines"]]
    for result in doc["sets"]:
        assert result["solutions"] is None  # the solver's
        assert result["report"]["all"]["mean_tokens_per_forward"] == 1.0
        # One forward per answer cell: the 2-step model does not stop before the 81st cell.
        assert result["report"]["all"]["mean_forwards"] == 81.0
    assert capsys.readouterr().out.count("(autoregressive,") == 2


def test_evaluate_cli_reports_bad_puzzle_file_with_line(tmp_path, puzzle_files, capsys):
    evaluate = load_script("evaluate")
    bad = tmp_path / "bad.txt"
    lines = open(puzzle_files["compact"]).read().splitlines()
    bad.write_text(lines[0] + "\n# comment\n" + lines[1][:30] + "x" + lines[1][31:] + "\n")
    code = evaluate.main(["evaluate", "--checkpoint=/nonexistent", f"--puzzles={bad}"])
    err = capsys.readouterr().err
    assert code == 1 and f"{bad}:3: bad character 'x' at cell 31" in err
    assert evaluate.main(["evaluate", f"--puzzles={bad}"]) == 2
    assert "exactly one of --checkpoint and --hf_dir" in capsys.readouterr().err


@pytest.mark.slow
def test_evaluate_cli_stops_at_an_invalid_puzzle_unless_allowed(trained, puzzle_files, pairs, tmp_path, capsys):
    puzzles, solutions = pairs
    evaluate = load_script("evaluate")
    path = tmp_path / "ambiguous.txt"
    several = np.zeros_like(puzzles[0])
    several[0] = solutions[0][0]  # one full row: many completions
    path.write_text("".join(sudoku.format_grid(p, "compact") + "\n" for p in (*puzzles[:3], several)))
    output = tmp_path / "eval.json"
    # Checked before the model loads: the puzzle's line, not the missing checkpoint.
    assert evaluate.main(["evaluate", "--checkpoint=/nonexistent", f"--puzzles={path}"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [f"evaluate: error: {path}:4: the puzzle has more than one solution; "
                                "--allow_invalid scores such puzzles anyway"]
    argv = ["evaluate", f"--checkpoint={os.path.join(trained[0], 'checkpoints')}", f"--puzzles={path}",
            "--steps=4", f"--batch_size={BATCH}", "--noprogress", f"--output={output}", "--allow_invalid"]
    assert evaluate.main(argv) == 0, capsys.readouterr().err
    assert (f"{path}: 1 invalid puzzle(s) scored (--allow_invalid), the first: {path}:4: the puzzle has more "
            "than one solution") in capsys.readouterr().out
    (result,) = json.loads(output.read_text())["sets"]
    assert result["count"] == 4 and result["invalid"] == [
        dict(index=3, problem=f"{path}:4: the puzzle has more than one solution")]


def test_evaluate_defaults_are_the_training_evaluation_but_for_the_temperature():
    """The CLI's defaults build the sampler, puzzle stream and batches of configs/sudoku.py's periodic evaluation,
    except its temperatures, 2.0 -> 1.0 (the trainer keeps the reference's 0.8 -> 0.4), so `--generate=128
    --min_givens=40 --t_min=0.4 --t_max=0.8` re-runs it."""
    from diffusion_gemma.training import evaluation

    evaluate = load_script("evaluate")
    config = evaluation.EvaluationConfig(**load_sudoku_config("").evaluation)
    fmt = CompactFormat()
    trainer_sampler = sudoku_eval.sampler_config(fmt, 81, **evaluation.sampler_settings(config))
    evaluate.parse(["evaluate", "--checkpoint=c", "--generate=1"])
    default = sudoku_eval.sampler_config(fmt, 81, **evaluate.sampler_overrides())
    assert (default.t_min, default.t_max) == (1.0, 2.0) and (trainer_sampler.t_min, trainer_sampler.t_max) == (0.4, 0.8)
    assert default == trainer_sampler.replace(t_min=1.0, t_max=2.0)
    assert default == sudoku_eval.sampler_config(fmt, 81, **sudoku_eval.PLAIN_SAMPLER)  # the notebook's settings
    flags = evaluate.FLAGS
    assert (flags.seed, flags.puzzle_seed, flags.batch_size, flags.max_givens) == (
        config.seed, config.seed, config.batch_size, config.options["max_givens"])
    evaluate.parse(["evaluate", "--checkpoint=c", "--generate=1", "--t_min=0.4", "--t_max=0.8"])
    assert sudoku_eval.sampler_config(fmt, 81, **evaluate.sampler_overrides()) == trainer_sampler


def test_denoise_plot_samples_with_the_evaluate_settings(monkeypatch, tmp_path):
    """`plots.py denoise` draws what `evaluate.py` would decode: its plain settings with the figure's own step
    budget and --greedy (it used the sampler's reference defaults before)."""
    plots = load_script("plots")
    puzzle, _ = sudoku.generate_puzzle(np.random.default_rng(5), 30)
    path = tmp_path / "one.txt"
    path.write_text(sudoku.format_grid(puzzle, "compact") + "\n")
    seen = {}

    class Captured(Exception):
        pass

    def capture(model, puzzles, fmt, config, **kwargs):
        seen["config"] = config
        raise Captured

    monkeypatch.setattr(sudoku_eval, "solve_diffusion", capture)
    with pytest.raises(Captured):
        plots.run(["plots", "denoise", f"--checkpoint={os.path.join(REPO, 'experiments', 'sudoku', 'checkpoint')}",
                   f"--puzzles={path}", "--steps=16", "--greedy", f"--output={tmp_path / 'd.png'}"])
    expected = sudoku_eval.sampler_config(CompactFormat(), 81,
                                          **{**sudoku_eval.PLAIN_SAMPLER, "max_denoising_steps": 16})
    assert seen["config"] == expected


@pytest.mark.slow
def test_training_curve_plot_from_the_run(trained, tmp_path):
    pytest.importorskip("matplotlib", reason="the plots need the optional 'plots' extra (matplotlib)")
    plots = load_script("plots")
    output = str(tmp_path / "curve.png")
    assert plots.main(["plots", "training", f"--workdir={trained[0]}", f"--output={output}"]) == 0
    assert open(output, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert plots.main(["plots", "training", f"--workdir={trained[0]}", f"--output={output}"]) == 1


def test_periodic_evaluation_passes_its_sampler_settings(monkeypatch, tmp_path):
    """The acceptance rule and threshold of `evaluation` reach the sampler; a bad rule fails at config time."""
    import types

    from diffusion_gemma.training import evaluation

    with pytest.raises(ValueError, match="evaluation.acceptance"):
        evaluation.EvaluationConfig(acceptance="most_likely")
    seen = {}

    def fake_solve(model, puzzles, fmt, sampler, **kwargs):
        seen["sampler"] = sampler
        boards = np.stack([sudoku.solve(p) for p in puzzles])  # a perfect solver: every board counts as solved
        return sudoku_eval.Answers(boards, np.full(len(boards), 5), np.full(len(boards), 16.2, np.float32))

    monkeypatch.setattr(sudoku_eval, "solve_diffusion", fake_solve)
    config = evaluation.EvaluationConfig(every_steps=1, kind="sudoku", num_examples=3,
                                         options=dict(min_givens=40, max_givens=45), max_denoising_steps=7, greedy=True, acceptance="confidence",
                                         accept_confidence=0.8)
    evaluate = evaluation.make_evaluator(config, DataConfig(source="sudoku"), None,
                                         str(tmp_path))
    values = evaluate(types.SimpleNamespace(config=types.SimpleNamespace(canvas_length=81)), 1)
    sampler = seen["sampler"]
    assert (sampler.acceptance, sampler.accept_confidence, sampler.max_denoising_steps, sampler.greedy) == (
        "confidence", 0.8, 7, True)
    assert values["solve_rate"] == 1.0 and values["easy/solve_rate"] == 1.0 and values["mean_forwards"] == 5.0


@pytest.mark.slow
def test_ablation_table_summarises_a_training_workdir(trained, tmp_path, capsys):
    workdir, result = trained
    table = load_script("ablation_table")
    out = tmp_path / "ablation.json"
    table.main([workdir, f"--json={out}"])
    (row,) = json.loads(out.read_text())
    assert row["run"] == os.path.basename(workdir) and row["step"] == row["eval_step"] == 2
    assert row["blank_cell_accuracy"] == result.history[-1]["eval/blank_cell_accuracy"]
    assert f"| {row['run']} | 2 |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="ablation.json exists"):
        table.main([workdir, f"--json={out}"])  # never overwrites a result
    with pytest.raises(SystemExit, match=r"nowhere/metrics.jsonl: no metrics"):
        table.main([str(tmp_path / "nowhere")])


def test_ablation_config_variants_change_one_thing_each():
    from diffusion_gemma.config import RopeConfig
    from diffusion_gemma.training.config import from_config_dict
    from diffusion_gemma.training.setup import model_config_for

    ablation = load_script("ablation_config")
    base = model_config_for(from_config_dict(load_sudoku_config("row_rope")))  # the recipe the A/Bs started from
    assert base.rope_global == RopeConfig.first_period(9, 32) and base.grid_rope is None
    row = from_config_dict(ablation.get_config("row_rope"))
    assert model_config_for(row) == base and row.num_steps == 300
    grid = from_config_dict(ablation.get_config("grid+steps800"))
    assert model_config_for(grid) == model_config_for(from_config_dict(load_sudoku_config("")))  # the default
    assert grid.num_steps == 800 and grid.evaluation.every_steps == 400
    assert from_config_dict(ablation.get_config("grid+steps1200")) == from_config_dict(load_sudoku_config(""))
    answer_only = from_config_dict(ablation.get_config("grid+ar_answer+steps800"))
    assert answer_only == dataclasses.replace(grid, objective=dataclasses.replace(grid.objective,
                                                                                  ar_targets="response"))
    gemma = model_config_for(from_config_dict(ablation.get_config("gemma_rope")))
    assert gemma.rope_global == ModelConfig.tiny().rope_global and gemma.rope_local == ModelConfig.tiny().rope_local
    local = model_config_for(from_config_dict(ablation.get_config("row_rope_local")))
    assert local.rope_local == RopeConfig.first_period(9, 16) and local.rope_global == gemma.rope_global
    mixed = from_config_dict(ablation.get_config("gemma_rope+ar0.1+lr0.006"))
    assert (mixed.objective.ar_weight, mixed.optimizer.learning_rate) == (0.1, 0.006)
    with pytest.raises(ValueError, match=r"ablation_config.py: unknown variant part 'rope9'"):
        ablation.get_config("rope9")


def test_long_variant_is_the_default_model_on_a_longer_run_down_to_twenty_givens():
    """`:long` (the committed checkpoint's recipe) changes the schedule, the data and the evaluation only; its data
    are the `curriculum20` A/B's (pool, symmetries) with one stage of 20-60 givens, the control that won the
    full-length A/B against that curriculum."""
    from diffusion_gemma.tasks.sudoku.source import options_of
    from diffusion_gemma.training.config import from_config_dict
    from diffusion_gemma.training.setup import model_config_for

    default, long = load_sudoku_config(""), load_sudoku_config("long")
    assert model_config_for(from_config_dict(long)) == model_config_for(from_config_dict(default))
    assert long.optimizer == default.optimizer and long.objective == default.objective
    assert long.data.num_synthetic_examples == long.num_steps * long.data.global_batch_size
    options = options_of(long.data)
    assert options.augment and options.pool_per_givens > 0 and options.givens_range == (20, 60)
    ablation = load_script("ablation_config")
    measured = options_of(ablation.get_config("grid+pool100+curriculum20+steps1200").data)
    assert options.curriculum == ((0.0, 20, 60),) and len(measured.curriculum) == 3
    # The data of the A/B but for the stages, pool cache included (same spec and seed).
    assert dataclasses.replace(measured, curriculum=options.curriculum) == options
    assert long.num_steps > default.num_steps and long.evaluation.options.min_givens == 20
    parsed = from_config_dict(long)
    assert parsed.checkpoint.every_minutes > 0 and parsed.num_steps % parsed.checkpoint.every_steps == 0


@pytest.mark.slow
def test_committed_checkpoint_reproduces_its_recorded_evaluation():
    """experiments/sudoku/checkpoint through the evaluate CLI with its defaults (the training evaluation's settings
    and seed, at the temperatures 2.0 -> 1.0) scores like its recorded three-seed evaluation
    (results/committed_checkpoint_three_seeds.json).
    Tolerance: 3 standard deviations around the recorded mean, the solve rate's deviation being the larger of the
    seeds' spread and the binomial standard error of 128 boards (at a rate of at most 127/128); the blank-cell
    accuracy's at least 0.5 points.
    Another CPU rounds differently and may flip a few greedy decisions, so an exact count would pass or fail by
    luck; a broken model or pipeline is far outside this band."""
    recorded = json.load(open(os.path.join(REPO, "experiments", "sudoku", "results",
                                           "committed_checkpoint_three_seeds.json")))["summary"]
    evaluate = load_script("evaluate")
    doc = evaluate.run(["evaluate", f"--checkpoint={os.path.join(REPO, 'experiments', 'sudoku', 'checkpoint')}",
                        "--generate=128", "--min_givens=40", "--noprogress"])
    (result,) = doc["sets"]
    report = result["report"]["all"]
    assert result["count"] == 128
    mean = recorded["solve_rate_mean"]
    rate = min(max(mean, 1 / 128), 1 - 1 / 128)  # a record of 128/128 still allows a board's worth of binomial noise
    solve_sd = max(recorded["solve_rate_stdev"], (rate * (1 - rate) / 128) ** 0.5)
    assert abs(report["solve_rate"] - mean) <= 3 * solve_sd, (report, recorded)
    blank_sd = max(recorded["blank_cell_accuracy_stdev"], 0.005)
    assert abs(report["blank_cell_accuracy"] - recorded["blank_cell_accuracy_mean"]) <= 3 * blank_sd, report
    assert report["givens_preserved_rate"] == 1.0


# ----------------------------------------------------------------------------- rule-checked best of N
def _broken(solution, puzzle):
    """`solution` with one blank cell changed to another digit: complete, givens kept, breaks a rule."""
    board = solution.copy()
    row, col = np.argwhere(puzzle == 0)[0]
    board[row, col] = board[row, col] % 9 + 1
    return board


def _with_blanks(solution, puzzle, count):
    board = solution.copy()
    for row, col in np.argwhere(puzzle == 0)[:count]:
        board[row, col] = 0
    return board


def test_best_of_keeps_the_first_answer_that_follows_the_rules(graded_pairs):
    """Puzzle 0 is right at once (never retried); puzzle 1 breaks a rule, then is right; puzzle 2 never follows
    the rules and keeps its attempt with the fewest problems. Forwards add up over every attempt made."""
    puzzles = np.stack([p for p, _ in graded_pairs])
    solutions = np.stack([s for _, s in graded_pairs])
    changed = solutions[2].copy()
    given = tuple(np.argwhere(puzzles[2])[0])
    changed[given] = changed[given] % 9 + 1  # a changed given, clashing in its units too
    plan = {1: [solutions[1], _broken(solutions[2], puzzles[2])],
            2: [_with_blanks(solutions[2], puzzles[2], 1)],
            3: [_with_blanks(solutions[2], puzzles[2], 5)]}
    calls = []

    def retry(subset, attempt):
        calls.append((attempt, len(subset)))
        boards = plan[attempt]
        assert len(subset) == len(boards)
        return sudoku_eval.Answers(np.stack(boards), np.full(len(boards), 8.0 * attempt),
                                   np.full(len(boards), 2.0, np.float32))

    first = sudoku_eval.Answers(np.stack([solutions[0], _broken(solutions[1], puzzles[1]), changed]),
                                np.array([4.0, 4.0, 4.0]), np.array([10.0, 10.0, 10.0], np.float32))
    chosen = sudoku_eval.best_of(puzzles, first, retry, max_attempts=4)
    assert calls == [(1, 2), (2, 1), (3, 1)]  # only the puzzles still breaking a rule are solved again
    np.testing.assert_array_equal(chosen.answers.boards[:2], solutions[:2])
    np.testing.assert_array_equal(chosen.answers.boards[2], _with_blanks(solutions[2], puzzles[2], 1))
    assert chosen.attempts.tolist() == [1, 2, 4]
    np.testing.assert_allclose(chosen.answers.forwards, [4, 4 + 8, 4 + 8 + 16 + 24])
    np.testing.assert_allclose(chosen.answers.tokens_per_forward[1], (40 + 16) / 12)
    assert [sudoku_eval.follows_rules(p, b) for p, b in zip(puzzles, chosen.answers.boards)] == [True, True, False]
    # One attempt: the first answers as they are.
    single = sudoku_eval.best_of(puzzles, first, retry, max_attempts=1)
    np.testing.assert_array_equal(single.answers.boards, first.boards)
    assert single.attempts.tolist() == [1, 1, 1] and len(calls) == 3
    with pytest.raises(ValueError, match="max_attempts"):
        sudoku_eval.best_of(puzzles, first, retry, max_attempts=0)


def test_rule_problems_count_clashes_changed_givens_and_blanks(graded_pairs):
    puzzle, solution = graded_pairs[1]
    assert sudoku_eval.rule_problems(puzzle, solution) == 0 and sudoku_eval.follows_rules(puzzle, solution)
    assert sudoku_eval.rule_problems(puzzle, _with_blanks(solution, puzzle, 3)) == 3
    broken = _broken(solution, puzzle)
    assert sudoku_eval.rule_problems(puzzle, broken) >= 2 and not sudoku_eval.follows_rules(puzzle, broken)


def _fake_sampler(puzzles, solutions, solved_at):
    """A `solve_diffusion` stand-in: puzzle i's answer follows the rules from attempt solved_at[i] on (the
    attempt read back from the seed), and breaks one before."""
    index = {p.tobytes(): i for i, p in enumerate(puzzles)}
    seen = []

    def solve(model, subset, fmt, config, *, seed=0, **kwargs):
        attempt = (seed - 1234) // 1_000_003
        seen.append((attempt, kwargs.get("fixed_shape")))
        rows = [index[p.tobytes()] for p in np.asarray(subset)]
        boards = [solutions[i] if attempt >= solved_at[i] else _broken(solutions[i], puzzles[i]) for i in rows]
        return sudoku_eval.Answers(np.stack(boards), np.full(len(rows), 3), np.full(len(rows), 27.0, np.float32))

    return solve, seen


def test_best_of_choice_never_reads_the_solutions(monkeypatch, pairs):
    """evaluate_set's best-of picks the same boards given the true solutions, none, or another puzzle's: only
    the scores change, and the plain entry is untouched by the option."""
    import types

    puzzles, solutions = pairs
    solve, seen = _fake_sampler(puzzles, solutions, solved_at=[0, 1, 2, 5, 1, 0])
    monkeypatch.setattr(sudoku_eval, "solve_diffusion", solve)
    scored = []
    real_scores = sudoku_eval.puzzle_scores
    monkeypatch.setattr(sudoku_eval, "puzzle_scores",
                        lambda p, answers, s=None: scored.append(answers.boards) or real_scores(p, answers, s))
    model = types.SimpleNamespace(config=types.SimpleNamespace(canvas_length=81))
    sampler = sudoku_eval.sampler_config(CompactFormat(), 81)
    results = {}
    for name, given in (("true", solutions), ("none", None), ("wrong", np.roll(solutions, 1, axis=0))):
        scored.clear()
        results[name] = sudoku_eval.evaluate_set(model, puzzles, CompactFormat(), "diffusion", sampler,
                                                 solutions=given, batch_size=4, seed=1234, best_of_attempts=3)
        results[name]["chosen"] = scored[1]
    for name in ("none", "wrong"):
        np.testing.assert_array_equal(results[name]["chosen"], results["true"]["chosen"])
    chosen = results["true"]["best_of_3"]
    assert chosen["max_attempts"] == 3 and chosen["mean_attempts"] == pytest.approx((1 + 2 + 3 + 3 + 2 + 1) / 6)
    assert chosen["report"]["all"]["solve_rate"] == pytest.approx(5 / 6)  # puzzle 3 needs a 6th attempt
    assert results["true"]["report"]["all"]["solve_rate"] == pytest.approx(2 / 6)
    assert chosen["report"]["all"]["mean_forwards"] == pytest.approx(3 * 12 / 6)
    assert results["wrong"]["best_of_3"]["report"] != chosen["report"]  # the scores do read the solutions
    plain = sudoku_eval.evaluate_set(model, puzzles, CompactFormat(), "diffusion", sampler, solutions=solutions,
                                     batch_size=4, seed=1234)
    assert set(plain) == {"count", "seconds", "report", "by_givens"}
    assert {k: v for k, v in plain.items() if k != "seconds"} == {
        k: v for k, v in results["true"].items() if k in ("count", "report", "by_givens")}
    # Restarts keep the set's batch and prompt shape (one compiled program).
    assert {shape for attempt, shape in seen if attempt > 0} == {(4, 82)}
    with pytest.raises(ValueError, match="diffusion decoder"):
        sudoku_eval.evaluate_set(model, puzzles, CompactFormat(), "autoregressive", best_of_attempts=2)


@pytest.fixture(scope="module")
def tiny_model():
    from diffusion_gemma.checkpoints.loading import single_device_config

    return DiffusionGemma(single_device_config(ModelConfig.tiny(**TINY_SUDOKU), "float32"), rngs=nnx.Rngs(4))


def test_best_of_with_the_sampler_reuses_its_program_and_leaves_the_plain_run(tiny_model, pairs):
    """With a real (untrained) model: restarts run on the puzzles still breaking a rule, with the plain run's
    compiled program, and the plain numbers equal those of a run without restarts."""
    from diffusion_gemma.sampling import sampler as sampler_lib

    puzzles, solutions = pairs
    fmt = CompactFormat()
    sampler = sudoku_eval.sampler_config(fmt, 81, max_denoising_steps=2, greedy=True)
    plain = sudoku_eval.evaluate_set(tiny_model, puzzles, fmt, "diffusion", sampler, solutions=solutions,
                                     batch_size=BATCH, seed=5)
    compiled = sampler_lib._generate_jit._cache_size()
    both = sudoku_eval.evaluate_set(tiny_model, puzzles, fmt, "diffusion", sampler, solutions=solutions,
                                    batch_size=BATCH, seed=5, best_of_attempts=3)
    assert sampler_lib._generate_jit._cache_size() == compiled
    assert both["report"] == plain["report"] and both["by_givens"] == plain["by_givens"]
    chosen = both["best_of_3"]
    assert chosen["mean_attempts"] == 3.0  # an untrained model never follows the rules: every restart runs
    assert chosen["report"]["all"]["mean_forwards"] == pytest.approx(3 * plain["report"]["all"]["mean_forwards"])


def test_evaluate_cli_prints_the_best_of_row_apart(monkeypatch, tiny_model, puzzle_files, tmp_path, capsys):
    from diffusion_gemma.checkpoints import loading

    evaluate = load_script("evaluate")
    monkeypatch.setattr(loading, "load", lambda **kwargs: loading.LoadedModel(tiny_model, None))
    common = ["evaluate", "--checkpoint=stand-in", f"--puzzles={puzzle_files['compact']}", "--limit=4",
              "--steps=2", f"--batch_size={BATCH}", "--noprogress", "--acceptance=margin", "--accept_margin=0.3"]
    plain = evaluate.run(common)
    assert "best_of" not in plain and set(plain["sets"][0]) == {
        "name", "source", "solutions", "count", "seconds", "report", "by_givens", "invalid"}
    assert plain["sampler"]["acceptance"] == "margin" and plain["sampler"]["accept_margin"] == 0.3
    capsys.readouterr()
    output = tmp_path / "best.json"
    assert evaluate.main(common + ["--best_of=2", f"--output={output}"]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert printed.count("compact.txt (diffusion") == 2 and "best_of_2: rule-checked restarts" in printed
    doc = json.loads(output.read_text())
    (result,) = doc["sets"]
    assert doc["best_of"] == 2 and result["best_of_2"]["max_attempts"] == 2
    assert result["report"] == json.loads(json.dumps(plain["sets"][0]["report"]))  # the plain row as without
    assert evaluate.main(common + ["--best_of=2", "--decoder=autoregressive"]) == 2
    assert "--best_of needs --decoder=diffusion" in capsys.readouterr().err
    assert evaluate.main(common + ["--best_of=0"]) == 2


def test_periodic_evaluation_passes_the_margin_rule():
    from diffusion_gemma.training import evaluation

    config = evaluation.EvaluationConfig(acceptance="margin", accept_margin=0.6)
    sampler = sudoku_eval.sampler_config(CompactFormat(), 81, **evaluation.sampler_settings(config))
    assert (sampler.acceptance, sampler.accept_margin) == ("margin", 0.6)
