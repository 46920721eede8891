"""One Sudoku evaluation run as the CLI and the plots script do it: a loaded model, a prompt format, one decoder
with its settings, several puzzle sets each scored on its own, and the JSON document that records all of it
(so a plot or a table can be rebuilt from the file alone)."""

from __future__ import annotations

import dataclasses
from typing import Sequence

from tqdm import tqdm

from diffusion_gemma.tasks.sudoku.formats import FORMATS, SudokuFormat, check_vocabulary, default_format_name, make_format
from diffusion_gemma.sampling.sampler import SamplerConfig
from diffusion_gemma.tasks.sudoku import evaluation as sudoku_eval
from diffusion_gemma.tasks.sudoku.puzzle_sets import PuzzleSet
from diffusion_gemma.model.transformer import DiffusionGemma

SCHEMA = "diffusion_gemma/sudoku_eval/v1"


def prompt_format(model: DiffusionGemma, name: str | None = None, tokenizer_path: str | None = None
                  ) -> tuple[str, SudokuFormat]:
    """(name, format): `name`, or compact for a vocabulary-16 model and chat otherwise; the chat format needs
    `tokenizer_path`. Checked against the model's vocabulary."""
    name = name or default_format_name(model.config.vocab_size)
    if name not in FORMATS:
        raise ValueError(f"format {name!r}; expected one of {FORMATS}")
    tokenizer = None
    if name == "chat":
        if not tokenizer_path:
            raise ValueError("the chat format needs the model's tokenizer: none ships with these weights "
                             "(no tokenizer.json / tokenizer.model next to them); pass --tokenizer")
        from diffusion_gemma.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_path)
    fmt = make_format(name, tokenizer)
    check_vocabulary(fmt, model.config.vocab_size)
    return name, fmt


def run(model: DiffusionGemma, sets: Sequence[PuzzleSet], fmt: SudokuFormat, *, decoder: str,
        sampler: SamplerConfig | None, batch_size: int, seed: int, progress: bool = True,
        best_of: int = 1) -> list[dict]:
    """Every set solved and scored on its own: [{name, source, solutions, ...evaluate_set's fields}]; `best_of`
    N > 1 adds each set's rule-checked best of N under `best_of_N` (`evaluate_set`)."""
    results = []
    for puzzle_set in sets:
        with tqdm(total=len(puzzle_set), desc=f"{decoder} {puzzle_set.name}", unit="puzzle", disable=not progress,
                  dynamic_ncols=True) as bar, \
                tqdm(desc=f"restarts {puzzle_set.name}", unit="puzzle", disable=not progress or best_of < 2,
                     dynamic_ncols=True) as restarts:
            scores = sudoku_eval.evaluate_set(model, puzzle_set.puzzles, fmt, decoder, sampler,
                                              solutions=puzzle_set.solutions, batch_size=batch_size, seed=seed,
                                              on_batch=bar.update, best_of_attempts=best_of,
                                              on_restart_batch=restarts.update)
        results.append(dict(name=puzzle_set.name, source=puzzle_set.source,
                            solutions=puzzle_set.solutions_source, **scores))
    return results


def document(results: list[dict], *, model: DiffusionGemma, model_source: dict, format_name: str, decoder: str,
             sampler: SamplerConfig | None, batch_size: int, seed: int, limit: int | None,
             best_of: int = 1) -> dict:
    """The JSON file's content. `sampler` is None for the autoregressive decoder (greedy, one token per
    forward). `best_of` is recorded only when > 1 (its sets then hold `best_of_N`): without it the document is
    the plain run's alone."""
    extra = dict(best_of=best_of) if best_of > 1 else {}
    return dict(schema=SCHEMA, model=dict(model_source, vocab_size=model.config.vocab_size,
                                          canvas_length=model.config.canvas_length),
                format=format_name, decoder=decoder,
                sampler=dataclasses.asdict(sampler) if sampler is not None else None,
                batch_size=batch_size, seed=seed, limit=limit, **extra, sets=results)


def tables(doc: dict) -> str:
    """`format_table` for every set of a document; a rule-checked best of N gets its own table after its set's
    plain one."""
    out = []
    for s in doc["sets"]:
        out.append(sudoku_eval.format_table(s["report"], f"{s['name']} ({doc['decoder']}, {s['seconds']:.1f} s)"))
        chosen = s.get(f"best_of_{doc.get('best_of', 1)}")
        if chosen is not None:
            out.append(sudoku_eval.format_table(
                chosen["report"], f"{s['name']} ({doc['decoder']}, best_of_{chosen['max_attempts']}: rule-checked "
                f"restarts, {chosen['mean_attempts']:.2f} attempts per puzzle, forwards summed over them, "
                f"{chosen['seconds']:.1f} s)"))
    return "\n\n".join(out)
