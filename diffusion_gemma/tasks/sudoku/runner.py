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
        sampler: SamplerConfig | None, batch_size: int, seed: int, progress: bool = True) -> list[dict]:
    """Every set solved and scored on its own: [{name, source, solutions, ...evaluate_set's fields}]."""
    results = []
    for puzzle_set in sets:
        with tqdm(total=len(puzzle_set), desc=f"{decoder} {puzzle_set.name}", unit="puzzle", disable=not progress,
                  dynamic_ncols=True) as bar:
            scores = sudoku_eval.evaluate_set(model, puzzle_set.puzzles, fmt, decoder, sampler,
                                              solutions=puzzle_set.solutions, batch_size=batch_size, seed=seed,
                                              on_batch=bar.update)
        results.append(dict(name=puzzle_set.name, source=puzzle_set.source,
                            solutions=puzzle_set.solutions_source, **scores))
    return results


def document(results: list[dict], *, model: DiffusionGemma, model_source: dict, format_name: str, decoder: str,
             sampler: SamplerConfig | None, batch_size: int, seed: int, limit: int | None) -> dict:
    """The JSON file's content. `sampler` is None for the autoregressive decoder (greedy, one token per
    forward)."""
    return dict(schema=SCHEMA, model=dict(model_source, vocab_size=model.config.vocab_size,
                                          canvas_length=model.config.canvas_length),
                format=format_name, decoder=decoder,
                sampler=dataclasses.asdict(sampler) if sampler is not None else None,
                batch_size=batch_size, seed=seed, limit=limit, sets=results)


def tables(doc: dict) -> str:
    """`format_table` for every set of a document."""
    return "\n\n".join(sudoku_eval.format_table(s["report"], f"{s['name']} ({doc['decoder']}, {s['seconds']:.1f} s)")
                       for s in doc["sets"])
