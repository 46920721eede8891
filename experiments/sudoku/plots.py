"""Plots of the Sudoku experiment (PNG, written atomically; an existing file is kept unless --overwrite).

Needs matplotlib: pip install -e ".[plots]".

    # (a) held-out solve rate vs training step, overall and by givens bucket, from a workdir's metrics.jsonl
    python experiments/sudoku/plots.py training --workdir=/tmp/sudoku --output=training.png
    # (b) solve rate (and decoder forwards) vs denoising steps, entropy bound, with / without early stopping:
    #     from evaluate.py JSON outputs ...
    python experiments/sudoku/plots.py sweep --results=s8.json,s16.json,ar.json --output=sweep.png
    #     ... or by running the evaluations here (--save_results keeps each one's JSON)
    python experiments/sudoku/plots.py sweep --checkpoint=/tmp/sudoku/checkpoints --puzzles=eval.txt \\
        --steps=8,16,32,64 --entropy_bounds=0.1,1.0 --early_stop=true,false --output=sweep.png
    # (c) solve rate by number of givens, from evaluate.py JSON outputs
    python experiments/sudoku/plots.py givens --results=eval.json --output=givens.png
    #     ... or one series per decoder over several files (e.g. one per givens bucket)
    python experiments/sudoku/plots.py givens --by_decoder --results=easy.json,hard.json,easy_ar.json --output=g.png
    # (d) one board being denoised step by step (evaluate.py's sampler settings, the first --steps budget)
    python experiments/sudoku/plots.py denoise --checkpoint=/tmp/sudoku/checkpoints --puzzles=eval.txt \\
        --index=3 --steps=16 --output=denoise.png
"""

from __future__ import annotations

import os
import sys

# Runnable from a checkout without `pip install -e .` (Python puts only this script's directory on sys.path).
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _REPO not in sys.path:
    sys.path.insert(1, _REPO)

from absl import flags  # noqa: E402

from diffusion_gemma import cli  # noqa: E402
from diffusion_gemma.cli import UsageError  # noqa: E402

COMMANDS = ("training", "sweep", "givens", "denoise")

FLAGS = flags.FlagValues()  # this script's own flags: importing it next to another CLI cannot clash
_OUTPUT = flags.DEFINE_string("output", None, "PNG to write.", flag_values=FLAGS)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --output.", flag_values=FLAGS)
_TITLE = flags.DEFINE_string("title", "", "Figure title.", flag_values=FLAGS)
_METRIC = flags.DEFINE_enum("metric", "solve_rate", ["solve_rate", "blank_cell_accuracy", "mean_forwards"],
                            "training: which held-out metric to draw.", flag_values=FLAGS)
_WORKDIR = flags.DEFINE_string("workdir", None, "training: the training workdir.", flag_values=FLAGS)
_RESULTS = flags.DEFINE_list("results", [], "sweep / givens: evaluate.py JSON outputs.", flag_values=FLAGS)
_BY_DECODER = flags.DEFINE_bool("by_decoder", False, "givens: one series per decoder, pooling the sets of every "
                                "--results file (e.g. one file per givens bucket).", flag_values=FLAGS)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "sweep / denoise: our checkpoint or a workdir's checkpoints/.",
                                  flag_values=FLAGS)
_HF_DIR = flags.DEFINE_string("hf_dir", None, "sweep / denoise: a HuggingFace directory instead.", flag_values=FLAGS)
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Tokenizer for the chat format (default: the model's).",
                                 flag_values=FLAGS)
_FORMAT = flags.DEFINE_enum("format", None, ["compact", "chat"], "Prompt format (default: by vocabulary).",
                            flag_values=FLAGS)
_PUZZLES = flags.DEFINE_string("puzzles", None, "sweep / denoise: puzzle file.", flag_values=FLAGS)
_SOLUTIONS = flags.DEFINE_string("solutions", None, "Its solutions (default: the solver's).", flag_values=FLAGS)
_LIMIT = flags.DEFINE_integer("limit", None, "sweep: only the first N puzzles.", flag_values=FLAGS)
_STEPS = flags.DEFINE_list("steps", ["8", "16", "32", "64"], "sweep: step budgets; denoise: the first one.",
                           flag_values=FLAGS)
_BOUNDS = flags.DEFINE_list("entropy_bounds", ["0.1"], "sweep: entropy bounds.", flag_values=FLAGS)
_EARLY_STOP = flags.DEFINE_list("early_stop", ["true", "false"], "sweep: early stopping on and/or off.",
                                flag_values=FLAGS)
_AUTOREGRESSIVE = flags.DEFINE_bool("autoregressive", True, "sweep: also run the autoregressive baseline.",
                                    flag_values=FLAGS)
_SAVE_RESULTS = flags.DEFINE_string("save_results", None, "sweep: also write each evaluation's JSON into this "
                                    "directory.", flag_values=FLAGS)
_INDEX = flags.DEFINE_integer("index", 0, "denoise: which puzzle of the file.", flag_values=FLAGS)
_GREEDY = flags.DEFINE_bool("greedy", False, "Argmax instead of sampling.", flag_values=FLAGS)
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.", flag_values=FLAGS)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "sweep: puzzles per batch.", flag_values=FLAGS)
_PANELS = flags.DEFINE_integer("panels", 12, "denoise: boards shown (evenly spaced steps, first and last kept).",
                               flag_values=FLAGS)


def _require(command: str, *names: str) -> None:
    missing = [name for name in names if not FLAGS[name].value]
    if missing:
        raise UsageError(f"{command} needs {', '.join('--' + m for m in missing)}")


def _model():
    from diffusion_gemma.checkpoints import loading
    from diffusion_gemma.tasks.sudoku import runner

    if (_CHECKPOINT.value is None) == (_HF_DIR.value is None):
        raise UsageError("give exactly one of --checkpoint and --hf_dir")
    loaded = loading.load(checkpoint=_CHECKPOINT.value, hf_dir=_HF_DIR.value)
    name, fmt = runner.prompt_format(loaded.model, _FORMAT.value, _TOKENIZER.value or loaded.tokenizer)
    return loaded, name, fmt


def _parse_bools(values: list[str]) -> list[bool]:
    out = []
    for value in values:
        if value.lower() not in ("true", "false"):
            raise UsageError(f"--early_stop takes true and/or false, got {value!r}")
        out.append(value.lower() == "true")
    return out


def _ints(values: list[str], name: str) -> list[int]:
    try:
        numbers = [int(v) for v in values]
    except ValueError:
        raise UsageError(f"--{name} takes integers, got {values}") from None
    if not numbers or min(numbers) <= 0:
        raise UsageError(f"--{name} takes positive integers, got {values}")
    return numbers


def run_sweep() -> list[dict]:
    """Evaluate every (steps, entropy bound, early stop) on one puzzle set (+ the AR baseline): documents."""
    from diffusion_gemma import atomic_write
    from diffusion_gemma.tasks.sudoku import puzzle_sets, runner
    from diffusion_gemma.tasks.sudoku import evaluation as sudoku_eval

    steps = _ints(_STEPS.value, "steps")
    try:
        bounds = [float(b) for b in _BOUNDS.value]
    except ValueError:
        raise UsageError(f"--entropy_bounds takes numbers, got {_BOUNDS.value}") from None
    early_stops = _parse_bools(_EARLY_STOP.value)
    puzzle_set = puzzle_sets.load_set(_PUZZLES.value, _SOLUTIONS.value, limit=_LIMIT.value)
    loaded, name, fmt = _model()
    model = loaded.model
    settings = [("diffusion", dict(max_denoising_steps=s, entropy_bound=b, early_stop=e, greedy=_GREEDY.value))
                for s in steps for b in bounds for e in early_stops]
    if _AUTOREGRESSIVE.value:
        settings.append(("autoregressive", None))
    if _SAVE_RESULTS.value:
        os.makedirs(_SAVE_RESULTS.value, exist_ok=True)
    docs = []
    for decoder, overrides in settings:
        sampler = sudoku_eval.sampler_config(fmt, model.config.canvas_length, **overrides) if overrides else None
        results = runner.run(model, [puzzle_set], fmt, decoder=decoder, sampler=sampler,
                             batch_size=_BATCH_SIZE.value, seed=_SEED.value)
        doc = runner.document(results, model=model, model_source=dict(checkpoint=_CHECKPOINT.value,
                                                                      hf_dir=_HF_DIR.value),
                              format_name=name, decoder=decoder, sampler=sampler, batch_size=_BATCH_SIZE.value,
                              seed=_SEED.value, limit=_LIMIT.value)
        print(runner.tables(doc), flush=True)
        if _SAVE_RESULTS.value:
            tag = ("ar" if overrides is None else
                   f"steps{overrides['max_denoising_steps']}_bound{overrides['entropy_bound']:g}_"
                   f"{'early' if overrides['early_stop'] else 'fixed'}")
            atomic_write.write_json(os.path.join(_SAVE_RESULTS.value, f"{tag}.json"), doc, overwrite=_OVERWRITE.value)
        docs.append(doc)
    return docs


def denoise_figure():
    from diffusion_gemma.tasks.sudoku import puzzles as sudoku
    from diffusion_gemma.tasks.sudoku import plot_data, plotting, puzzle_sets
    from diffusion_gemma.tasks.sudoku import evaluation as sudoku_eval

    if _INDEX.value < 0:
        raise UsageError("--index must be >= 0")
    puzzle_set = puzzle_sets.load_set(_PUZZLES.value, _SOLUTIONS.value, limit=_INDEX.value + 1)
    if _INDEX.value >= len(puzzle_set):
        raise UsageError(f"--index={_INDEX.value}: {_PUZZLES.value} has {len(puzzle_set)} puzzle(s)")
    puzzle = puzzle_set.puzzles[_INDEX.value]
    solution = puzzle_set.solutions[_INDEX.value] if puzzle_set.solutions is not None else sudoku.solve(puzzle)
    loaded, _, fmt = _model()
    events = []
    # evaluate.py's sampler (the plain settings of the reported numbers) with this command's budget and --greedy
    sampler = sudoku_eval.sampler_config(fmt, loaded.model.config.canvas_length,
                                         **{**sudoku_eval.PLAIN_SAMPLER, "greedy": _GREEDY.value,
                                            "max_denoising_steps": _ints(_STEPS.value, "steps")[0]})
    sudoku_eval.solve_diffusion(loaded.model, puzzle[None], fmt, sampler, batch_size=1, seed=_SEED.value,
                                on_step=events.append)
    frames = plot_data.pick(plot_data.frames_from_events(events, fmt), _PANELS.value)
    return plotting.denoising(puzzle, solution, frames, title=_TITLE.value)


def run(argv: list[str]) -> str:
    """Parse `argv` (the command first), draw, save; returns the PNG path."""
    try:
        FLAGS.unparse_flags()
        rest = FLAGS(cli.strip_verbose(argv))
    except flags.Error as err:
        raise UsageError(str(err)) from None
    if len(rest) != 2 or rest[1] not in COMMANDS:
        typo = cli.did_you_mean(rest[1], COMMANDS) if len(rest) == 2 else ""
        raise UsageError(f"give one command: {' | '.join(COMMANDS)}{typo} (--help lists the commands and flags)")
    command = rest[1]
    if not _OUTPUT.value:
        raise UsageError("--output=FILE.png is required")
    from diffusion_gemma import atomic_write
    from diffusion_gemma.tasks.sudoku import plot_data, plotting

    atomic_write.check_new(_OUTPUT.value, overwrite=_OVERWRITE.value)  # before any work
    if command == "training":
        _require(command, "workdir")
        curves = plot_data.training_curves(plot_data.read_metrics(_WORKDIR.value), _METRIC.value)
        if not curves:
            raise ValueError(f"{_WORKDIR.value}/metrics.jsonl has no eval/*{_METRIC.value} values (was the run "
                             "evaluated? set evaluation.every_steps)")
        figure = plotting.training_curves(curves, _TITLE.value, metric=_METRIC.value)
    elif command == "sweep":
        if _RESULTS.value:
            docs = plot_data.read_documents(_RESULTS.value)
        else:
            _require(command, "puzzles")
            docs = run_sweep()
        figure = plotting.sweep(plot_data.sweep_points(docs), _TITLE.value)
    elif command == "givens":
        _require(command, "results")
        docs = plot_data.read_documents(_RESULTS.value)
        if _BY_DECODER.value:
            series = plot_data.solve_rate_by_givens_per_decoder(docs)
        else:
            series = {}
            for doc in docs:
                for name, values in plot_data.solve_rate_by_givens(doc).items():
                    series[f"{name} ({doc['decoder']})" if len(_RESULTS.value) > 1 else name] = values
        figure = plotting.by_givens(series, _TITLE.value)
    else:
        _require(command, "puzzles")
        figure = denoise_figure()
    plotting.save(figure, _OUTPUT.value, overwrite=_OVERWRITE.value)
    print(f"wrote {_OUTPUT.value}")
    return _OUTPUT.value


def main(argv: list[str]) -> int:
    if any(arg in ("-h", "--help", "--helpshort") for arg in argv[1:]):
        print(__doc__ + "\n" + FLAGS.get_help())
        return 0

    def draw() -> int:
        run(argv)
        return 0

    return cli.exit_status(os.path.basename(argv[0]), draw, user_errors=(ValueError, OSError, ImportError),
                           argv=argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
