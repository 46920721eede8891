"""Evaluate a DiffusionGemma model on Sudoku: solve rate and friends, by difficulty bucket, as a table and JSON.

    python experiments/sudoku/evaluate.py --checkpoint=/tmp/sudoku/checkpoints \\
        --puzzles=easy.txt,hard.txt --solutions=easy_solutions.txt,hard_solutions.txt --output=eval.json
    python experiments/sudoku/evaluate.py --hf_dir=/path/to/diffusiongemma-26B-A4B-it --puzzles=top95.txt \\
        --decoder=autoregressive --limit=20
    python experiments/sudoku/evaluate.py --checkpoint=CKPT --generate=128 --min_givens=40

The defaults are the periodic evaluation of `configs/sudoku.py` (`config.evaluation`): puzzle stream and sampling
seed 1234, batches of 64 (a batch's noise key folds in its first puzzle's index, so the batch size is part of
the seed), greedy, up to 64 denoising steps, the confidence rule at 0.95, early stopping; with one difference,
the temperature: 2.0 at the first step falling linearly towards 1.0 here (`PLAIN_SAMPLER` of
diffusion_gemma/tasks/sudoku/evaluation.py), where the trainer keeps the reference's 0.8 falling to 0.4.
Under greedy decoding the temperature moves no argmax; it sets which cells pass the confidence rule and how
sharp the logits fed back as the next step's self-conditioning are (training feeds back unscaled logits). On
validation streams of held-out puzzles (puzzle seeds 4321 and 5678, not the reported 1234) 2.0 -> 1.0 solved
more boards than the reference's schedule and than any constant (experiments/sudoku/README.md, "Sampler
temperature"). `--t_min=0.4 --t_max=0.8` therefore makes the last command above re-run the default recipe's
training evaluation (128 held-out puzzles with 40-60 givens) on a checkpoint's weights and reproduce the numbers
the trainer logged for them; `--min_givens` defaults to 20 (every difficulty bucket) as the `:gpu` and finetune
recipes evaluate.

The model: `--checkpoint` (one of our checkpoints, or a training workdir's `checkpoints/`: latest step, LoRA
adapters merged) or `--hf_dir`. Puzzles: comma-separated files, each scored on its own (one grid per line, 81
cells with '.' or '0' for blanks or space-separated, or 9 lines of 9), with optional line-aligned solution
files (else the solver's), and/or `--generate=N` held-out puzzles from the eval side of the split rule. Every
puzzle of a file is checked first: givens breaking a rule, no solution, several solutions or a listed solution
that does not complete its puzzle stop the run with the file and line, unless `--allow_invalid` (then they are
scored and listed under `invalid` in the JSON). The public benchmark sets: experiments/sudoku/download_sets.py.
Prompt format: compact for a vocabulary-16 model, else chat with the model's tokenizer (`--tokenizer` when
none ships with the weights). Decoders: the block-diffusion sampler (settings below) or greedy
autoregressive decoding through the encoder (the baseline).

Reported per set, overall and by bucket (easy >= 40 givens, medium 30-39, hard < 30): exact-board solve rate,
cell accuracy on the blanks, rate of answers breaking a Sudoku rule, rate of answers keeping every given, mean
denoising steps (decoder forwards; AR: tokens decoded) and tokens per forward; in the JSON also by number of
givens. `--output` is written atomically and never replaces a file without `--overwrite`.

`--best_of=N` (diffusion) adds, on its own row and under `best_of_N` in the JSON, a rule-checked best of N: every
puzzle whose answer breaks a Sudoku rule, changes a given or leaves a cell unreadable is solved again with
another seed, up to N attempts in all, and keeps its first answer that follows the rules (else the one with the
fewest problems). The check reads only the puzzle, never a solution; forwards are summed over the attempts. The
plain row is the first attempt, exactly what the run gives without the flag.
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
from diffusion_gemma.sampling.sampler import ACCEPTANCE_RULES  # noqa: E402
from diffusion_gemma.tasks.sudoku.evaluation import PLAIN_SAMPLER  # noqa: E402

FLAGS = flags.FlagValues()  # this script's own flags: importing it next to another CLI cannot clash
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Our Orbax checkpoint, or a training workdir's checkpoints/ "
                                  "(latest step; LoRA adapters are merged).", flag_values=FLAGS)
_HF_DIR = flags.DEFINE_string("hf_dir", None, "HuggingFace DiffusionGemma directory.", flag_values=FLAGS)
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "tokenizer.json / tokenizer.model for the chat format "
                                 "(default: the one next to the weights).", flag_values=FLAGS)
_PUZZLES = flags.DEFINE_list("puzzles", [], "Puzzle files, comma-separated; each is reported separately.",
                             flag_values=FLAGS)
_SOLUTIONS = flags.DEFINE_list("solutions", [], "Solution files, one per puzzle file, same order (default: the "
                               "solver's solutions).", flag_values=FLAGS)
_GENERATE = flags.DEFINE_integer("generate", 0, "Also evaluate on this many generated held-out puzzles.",
                                 flag_values=FLAGS)
_MIN_GIVENS = flags.DEFINE_integer("min_givens", 20, "--generate: fewest givens.", flag_values=FLAGS)
_MAX_GIVENS = flags.DEFINE_integer("max_givens", 60, "--generate: most givens.", flag_values=FLAGS)
_PUZZLE_SEED = flags.DEFINE_integer("puzzle_seed", 1234, "--generate: seed of the puzzle stream.", flag_values=FLAGS)
_LIMIT = flags.DEFINE_integer("limit", None, "Evaluate only the first N puzzles of each file.", flag_values=FLAGS)
_ALLOW_INVALID = flags.DEFINE_bool("allow_invalid", False, "Score puzzles whose givens break a rule, that have no "
                                   "or several solutions, or whose listed solution is wrong (listed as invalid "
                                   "in the JSON) instead of stopping at the first.", flag_values=FLAGS)
_FORMAT = flags.DEFINE_enum("format", None, ["compact", "chat"], "Prompt format (default: compact for a "
                            "vocabulary-16 model, else chat).", flag_values=FLAGS)
_DECODER = flags.DEFINE_enum("decoder", "diffusion", ["diffusion", "autoregressive"], "How answers are decoded.",
                             flag_values=FLAGS)
_STEPS = flags.DEFINE_integer("steps", PLAIN_SAMPLER["max_denoising_steps"], "Denoising step budget per canvas.",
                              flag_values=FLAGS)
_ACCEPTANCE = flags.DEFINE_enum("acceptance", PLAIN_SAMPLER["acceptance"], list(ACCEPTANCE_RULES),
                                "Acceptance rule.", flag_values=FLAGS)
_ENTROPY_BOUND = flags.DEFINE_float("entropy_bound", 0.1, "Bound of the entropy_bound rule.", flag_values=FLAGS)
_ACCEPT_CONFIDENCE = flags.DEFINE_float("accept_confidence", PLAIN_SAMPLER["accept_confidence"],
                                        "Threshold of the confidence rule.", flag_values=FLAGS)
_ACCEPT_TOP_K = flags.DEFINE_integer("accept_top_k", None, "k of the top_k rule (default: canvas / steps).",
                                     flag_values=FLAGS)
_ACCEPT_MARGIN = flags.DEFINE_float("accept_margin", 0.9, "Threshold of the margin rule (top-two probability "
                                    "margin; 1: one position per step, largest margin first).", flag_values=FLAGS)
_BEST_OF = flags.DEFINE_integer("best_of", 1, "Also report a rule-checked best of N (restarts of the answers "
                                "breaking a rule, checked against the puzzle only) on its own row.",
                                flag_values=FLAGS)
_GREEDY = flags.DEFINE_bool("greedy", PLAIN_SAMPLER["greedy"], "Argmax instead of sampling (--nogreedy: sample "
                            "at the --t_max..--t_min temperatures).", flag_values=FLAGS)
_EARLY_STOP = flags.DEFINE_bool("early_stop", True, "Stop a canvas once stable and confident (--noearly_stop: "
                                "always --steps steps).", flag_values=FLAGS)
_T_MIN = flags.DEFINE_float("t_min", PLAIN_SAMPLER["t_min"], "Temperature schedule's floor (t_min = t_max: "
                            "constant; the trainer's evaluation: 0.4).", flag_values=FLAGS)
_T_MAX = flags.DEFINE_float("t_max", PLAIN_SAMPLER["t_max"], "Temperature at the first step (the trainer's "
                            "evaluation: 0.8).", flag_values=FLAGS)
_SEED = flags.DEFINE_integer("seed", 1234, "Sampling seed (the initial canvases, even when greedy).",
                             flag_values=FLAGS)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Puzzles per batch (part of the noise key: see above).",
                                   flag_values=FLAGS)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter and compute dtype.",
                           flag_values=FLAGS)
_OUTPUT = flags.DEFINE_string("output", None, "Write the results here as JSON.", flag_values=FLAGS)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --output.", flag_values=FLAGS)
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.", flag_values=FLAGS)


def parse(argv: list[str]) -> None:
    try:
        FLAGS.unparse_flags()
        FLAGS(argv)
    except flags.Error as err:
        raise UsageError(f"{err} (--help lists the flags)") from None
    if (_CHECKPOINT.value is None) == (_HF_DIR.value is None):
        raise UsageError("give exactly one of --checkpoint and --hf_dir")
    if not _PUZZLES.value and not _GENERATE.value:
        raise UsageError("give --puzzles=FILE[,FILE...] and/or --generate=N")
    if _SOLUTIONS.value and len(_SOLUTIONS.value) != len(_PUZZLES.value):
        raise UsageError(f"--solutions has {len(_SOLUTIONS.value)} file(s) for {len(_PUZZLES.value)} puzzle "
                         "file(s); give one per puzzle file, in the same order")
    if _BATCH_SIZE.value <= 0 or _STEPS.value <= 0 or (_LIMIT.value is not None and _LIMIT.value <= 0):
        raise UsageError("--batch_size, --steps and --limit must be positive")
    if _BEST_OF.value < 1:
        raise UsageError(f"--best_of must be >= 1, got {_BEST_OF.value}")
    if _BEST_OF.value > 1 and _DECODER.value != "diffusion":
        raise UsageError("--best_of needs --decoder=diffusion (autoregressive decoding is deterministic: every "
                         "attempt would give the same answer)")


def sampler_overrides() -> dict:
    return dict(max_denoising_steps=_STEPS.value, acceptance=_ACCEPTANCE.value, entropy_bound=_ENTROPY_BOUND.value,
                accept_confidence=_ACCEPT_CONFIDENCE.value, accept_top_k=_ACCEPT_TOP_K.value,
                accept_margin=_ACCEPT_MARGIN.value,
                greedy=_GREEDY.value, early_stop=_EARLY_STOP.value, t_min=_T_MIN.value, t_max=_T_MAX.value)


def run(argv: list[str]) -> dict:
    """Parse `argv`, evaluate, print the tables, write --output; returns the JSON document."""
    parse(argv)
    from diffusion_gemma.checkpoints import loading
    from diffusion_gemma import atomic_write
    from diffusion_gemma.tasks.sudoku import puzzle_sets, runner
    from diffusion_gemma.tasks.sudoku import evaluation as sudoku_eval

    if _OUTPUT.value:
        atomic_write.check_new(_OUTPUT.value, overwrite=_OVERWRITE.value)  # before any work
    solutions = _SOLUTIONS.value or [None] * len(_PUZZLES.value)
    try:
        sets = [puzzle_sets.load_set(p, s, limit=_LIMIT.value, allow_invalid=_ALLOW_INVALID.value)
                for p, s in zip(_PUZZLES.value, solutions)]
    except puzzle_sets.InvalidPuzzleError as err:
        raise cli.UserError(f"{err}; --allow_invalid scores such puzzles anyway") from None
    if _GENERATE.value:
        sets.append(puzzle_sets.generated_set(_GENERATE.value, seed=_PUZZLE_SEED.value,
                                              min_givens=_MIN_GIVENS.value, max_givens=_MAX_GIVENS.value))
    loaded = loading.load(checkpoint=_CHECKPOINT.value, hf_dir=_HF_DIR.value, dtype=_DTYPE.value)
    model = loaded.model
    format_name, fmt = runner.prompt_format(model, _FORMAT.value, _TOKENIZER.value or loaded.tokenizer)
    sampler = None
    if _DECODER.value == "diffusion":
        sampler = sudoku_eval.sampler_config(fmt, model.config.canvas_length, **sampler_overrides())
    results = runner.run(model, sets, fmt, decoder=_DECODER.value, sampler=sampler, batch_size=_BATCH_SIZE.value,
                         seed=_SEED.value, progress=_PROGRESS.value, best_of=_BEST_OF.value)
    for result, puzzle_set in zip(results, sets):
        result["invalid"] = [dict(index=p.index, problem=p.problem) for p in puzzle_set.invalid]
    source = dict(checkpoint=_CHECKPOINT.value, hf_dir=_HF_DIR.value, merged_adapters=loaded.merged_adapters,
                  dtype=_DTYPE.value)
    doc = runner.document(results, model=model, model_source=source, format_name=format_name,
                          decoder=_DECODER.value, sampler=sampler, batch_size=_BATCH_SIZE.value, seed=_SEED.value,
                          limit=_LIMIT.value, best_of=_BEST_OF.value)
    print(runner.tables(doc), flush=True)
    for puzzle_set in sets:
        if puzzle_set.invalid:
            print(f"{puzzle_set.name}: {len(puzzle_set.invalid)} invalid puzzle(s) scored (--allow_invalid), "
                  f"the first: {puzzle_set.invalid[0].problem}")
    if _OUTPUT.value:
        atomic_write.write_json(_OUTPUT.value, doc, overwrite=_OVERWRITE.value)
        print(f"wrote {_OUTPUT.value}")
    return doc


def main(argv: list[str]) -> int:
    """Exit status 0; 1 with one line on stderr naming the file and line (bad or invalid puzzle files), the
    checkpoint or the output for a failed run; 2 for bad flags. `--verbose` adds the traceback."""
    if any(arg in ("-h", "--help", "--helpshort") for arg in argv[1:]):
        print(__doc__ + "\n" + FLAGS.get_help())
        return 0
    from diffusion_gemma.checkpoints.safetensors_dir import CheckpointError
    from diffusion_gemma.config import ConfigError

    def evaluate() -> int:
        run(cli.strip_verbose(argv))
        return 0

    try:
        cli.run_main(os.path.basename(argv[0]), evaluate, argv=argv,
                     user_errors=(ValueError, OSError, CheckpointError, ConfigError))
    except SystemExit as done:
        return done.code


if __name__ == "__main__":
    sys.exit(main(sys.argv))
