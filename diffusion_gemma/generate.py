"""`python -m diffusion_gemma.generate`: answer prompts with the jitted block-diffusion sampler.

    python -m diffusion_gemma.generate --hf_dir=DIR --prompt="Why is the sky blue?" --chat
    python -m diffusion_gemma.generate --checkpoint=CKPT --prompts_file=prompts.jsonl --output=answers.jsonl

The model comes from a HuggingFace directory (`--hf_dir`) or one of our Orbax checkpoints (`--checkpoint`, a
training run's `WORKDIR/checkpoints` included, LoRA adapters merged), loaded by `checkpoints.loading.load` as
the evaluation scripts load it, with the tokenizer and generation config that travel with it. Sampling settings are the
model's `generation_config.json`, then the flags. A prompts file is JSONL, one prompt per line: a JSON string or an
object with a "prompt" field (and optionally a "template", below); prompts are left-padded into batches of
`--batch_size`. For every prompt the answer, its tokens per decoder forward pass and the batch's wall time are
printed.

Infilling: `--template` gives the answer's known text, with `--blank` (default `_`) standing for each token the
model fills in; the known tokens are clamped (written into the canvas at every step, never resampled), so the
answer holds them where the template puts them:

    python -m diffusion_gemma.generate --hf_dir=DIR --chat --prompt="Name a fruit and its colour." \
        --template="Fruit: ___ Colour: __" --max_new_tokens=32

Each blank is exactly one token; the text between blanks is tokenized on its own. The template covers the
answer's first tokens (blanks included, at most `--max_new_tokens`); the model writes the rest freely, and it
cannot end the answer (EOS) before the template's last known token. In a prompts file, an object's "template"
field does the same for that prompt.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from typing import Callable, Sequence

import jax
import numpy as np
from absl import flags, logging

from diffusion_gemma import cli
from diffusion_gemma.data.chat import user_prompt_ids
from diffusion_gemma.data.tokenizer import Tokenizer, TokenizerError, load_tokenizer, vocabulary_task
from diffusion_gemma.sampling import sampler as sampler_lib
from diffusion_gemma.model.transformer import DiffusionGemma

BLANK = "_"  # a template's default placeholder of one unknown token

_HF_DIR = flags.DEFINE_string("hf_dir", None, "HuggingFace DiffusionGemma directory (config.json + safetensors).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Our Orbax checkpoint directory (or a trainer's root).")
_PROMPT = flags.DEFINE_string("prompt", None, "One prompt.")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "JSONL file of prompts (batch mode).")
_CHAT = flags.DEFINE_bool("chat", False, "Render each prompt as a Gemma 4 user turn followed by the model header.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", None, "Tokens to generate (rounded up to whole canvases).")
_MAX_STEPS = flags.DEFINE_integer("max_denoising_steps", None, "Denoising step budget per canvas.")
_STRATEGY = flags.DEFINE_enum("strategy", None, list(sampler_lib.ACCEPTANCE_RULES),
                              "Acceptance rule (default: entropy_bound, the reference's).")
_ENTROPY_BOUND = flags.DEFINE_float("entropy_bound", None, "Bound of the entropy_bound rule.")
_ACCEPT_CONFIDENCE = flags.DEFINE_float("accept_confidence", None, "Threshold of the confidence rule.")
_ACCEPT_TOP_K = flags.DEFINE_integer("accept_top_k", None, "k of the top_k rule.")
_ACCEPT_MARGIN = flags.DEFINE_float("accept_margin", None, "Top-two probability margin of the margin rule.")
_GREEDY = flags.DEFINE_bool("greedy", False, "Take the argmax instead of sampling.")
_FIXED_STEPS = flags.DEFINE_bool("fixed_steps", False, "Run every canvas for exactly max_denoising_steps steps.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Prompts per batch in batch mode.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "tokenizer.json / sentencepiece model (default: the model's).")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Parameter dtype.")
_COMPUTE_DTYPE = flags.DEFINE_string("compute_dtype", None, "Compute dtype (default: the parameter dtype).")
_SHOW_STEPS = flags.DEFINE_bool("show_steps", False, "Print every row's argmax canvas after each denoising step.")
_OUTPUT = flags.DEFINE_string("output", None, "Also write one JSON line per prompt here (refused if it exists, "
                              "unless --overwrite).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --output.")
_TEMPLATE = flags.DEFINE_string("template", None, "The answer's known text, --blank marking each token to fill in "
                                "(one token per blank); the known tokens are clamped. Only with --prompt (a prompts "
                                "file gives a 'template' per prompt).")
_BLANK = flags.DEFINE_string("blank", BLANK, "The placeholder of one unknown token in a --template.")


@dataclasses.dataclass(frozen=True)
class Clamp:
    """Known tokens of an answer (answer-relative positions 0..W-1): `ids[i]` is given where `known[i]`."""

    ids: tuple[int, ...]
    known: tuple[bool, ...]


@dataclasses.dataclass(frozen=True)
class PromptLine:
    """One prompt of a prompts file, its optional template and where it was read ('FILE:LINE')."""

    prompt: str
    template: str | None
    where: str


@dataclasses.dataclass(frozen=True)
class Answer:
    prompt: str
    text: str
    token_ids: list[int]
    tokens_per_forward: float
    denoising_steps: int
    seconds: float
    template: str | None = None


def sampler_overrides(**flag_values) -> dict:
    """Flag values -> SamplerConfig fields (unset flags left out)."""
    names = dict(max_new_tokens="max_new_tokens", max_denoising_steps="max_denoising_steps", strategy="acceptance",
                 entropy_bound="entropy_bound", accept_confidence="accept_confidence", accept_top_k="accept_top_k",
                 accept_margin="accept_margin")
    overrides = {names[k]: v for k, v in flag_values.items() if k in names and v is not None}
    if flag_values.get("greedy"):
        overrides["greedy"] = True
    if flag_values.get("fixed_steps"):
        overrides["early_stop"] = False
    return overrides


def read_prompts(path: str) -> list[PromptLine]:
    prompts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line.rstrip())  # without the newline, a column on this line
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}:{err.colno}: invalid JSON ({err.msg})") from None
            prompt = record.get("prompt") if isinstance(record, dict) else record
            if not isinstance(prompt, str):
                raise ValueError(f"{path}:{number}: expected a JSON string or an object with a string 'prompt'")
            template = record.get("template") if isinstance(record, dict) else None
            if template is not None and not isinstance(template, str):
                raise ValueError(f"{path}:{number}: 'template' must be a string")
            prompts.append(PromptLine(prompt, template, f"{path}:{number}"))
    return prompts


def parse_template(tokenizer: Tokenizer, template: str, *, blank: str = BLANK,
                   max_new_tokens: int | None = None) -> Clamp:
    """A template -> the `Clamp` of the answer's first tokens: each `blank` is one unknown token, the text
    between blanks is tokenized on its own and known. Errors say which length or part is wrong."""
    if not blank:
        raise ValueError("the blank placeholder must not be empty")
    ids, known = [], []
    for index, piece in enumerate(template.split(blank)):
        if index:
            ids.append(0)
            known.append(False)
        piece_ids = tokenizer.encode(piece) if piece else []
        ids += piece_ids
        known += [True] * len(piece_ids)
    if not any(known):
        raise ValueError(f"{template!r} has no known text, only blanks ({blank!r}): nothing to clamp")
    if max_new_tokens is not None and len(ids) > max_new_tokens:
        raise ValueError(f"{template!r} is {len(ids)} tokens long (blanks included), more than max_new_tokens = "
                         f"{max_new_tokens}")
    return Clamp(tuple(ids), tuple(known))


def clamp_arrays(clamps: Sequence[Clamp | None], width: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-row clamps (None: no clamp) -> (clamp_ids, clamp_mask) [B, width] for `sampler.generate`."""
    ids = np.zeros((len(clamps), width), np.int32)
    mask = np.zeros((len(clamps), width), bool)
    for row, clamp in enumerate(clamps):
        if clamp is not None:
            if len(clamp.ids) > width:
                raise ValueError(f"row {row}: a clamp of {len(clamp.ids)} tokens does not fit {width}")
            ids[row, : len(clamp.ids)] = clamp.ids
            mask[row, : len(clamp.known)] = clamp.known
    return ids, mask


def trim_answer(generated: np.ndarray, config: sampler_lib.SamplerConfig) -> list[int]:
    """A row's generated tokens up to (not including) its first EOS, pads dropped."""
    ids = []
    for token in np.asarray(generated).tolist():
        if token in config.eos_token_ids:
            break
        if token != config.pad_token_id:
            ids.append(token)
    return ids


def answer_prompts(model: DiffusionGemma, tokenizer: Tokenizer, prompts: Sequence[str],
                   config: sampler_lib.SamplerConfig, *, chat: bool = False, seed: int = 0, batch_size: int = 8,
                   on_step: Callable[[sampler_lib.StepEvent], None] | None = None,
                   templates: Sequence[str | None] | None = None, blank: str = BLANK) -> list[Answer]:
    """Generate for every prompt, `batch_size` at a time (left-padded), with the key `seed` folded per batch.
    `templates` (one per prompt, None for none; see the module docstring) clamp the answers' known tokens."""
    templates = [None] * len(prompts) if templates is None else list(templates)
    if len(templates) != len(prompts):
        raise ValueError(f"{len(templates)} templates for {len(prompts)} prompts")
    clamps = [None if t is None else parse_template(tokenizer, t, blank=blank, max_new_tokens=config.max_new_tokens)
              for t in templates]
    answers = []
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start:start + batch_size])
        encoded = [user_prompt_ids(tokenizer, p) if chat else [tokenizer.bos_id] + tokenizer.encode(p)
                   for p in batch]
        batch_clamps = clamps[start:start + batch_size]
        too_large = max(max(ids) for ids in encoded + [c.ids for c in batch_clamps if c is not None])
        if too_large >= model.config.vocab_size:
            raise TokenizerError(f"token id {too_large} is outside the model's vocabulary ({model.config.vocab_size}): "
                             "is the tokenizer the model's?")
        prompt_ids, prompt_mask = sampler_lib.left_pad(encoded, tokenizer.pad_id)
        clamp_ids, clamp_mask = (clamp_arrays(batch_clamps, config.max_new_tokens)
                                 if any(c is not None for c in batch_clamps) else (None, None))
        key = jax.random.fold_in(jax.random.key(seed), start // batch_size)
        began = time.perf_counter()
        result = sampler_lib.generate(model, prompt_ids, prompt_mask, key, config, on_step=on_step,
                                      clamp_ids=clamp_ids, clamp_mask=clamp_mask)
        generated = result.generated()  # blocks until the device is done
        seconds = time.perf_counter() - began
        per_forward = result.tokens_per_forward()
        for row, prompt in enumerate(batch):
            ids = trim_answer(generated[row], config)
            answers.append(Answer(prompt=prompt, text=tokenizer.decode(ids), token_ids=ids,
                                  tokens_per_forward=float(per_forward[row]), denoising_steps=result.total_steps(),
                                  seconds=seconds, template=templates[start + row]))
    return answers


def print_steps(tokenizer: Tokenizer) -> Callable[[sampler_lib.StepEvent], None]:
    def show(event: sampler_lib.StepEvent):
        for row, canvas in enumerate(event.argmax):
            state = "done" if event.done[row] else f"{int(event.accepted[row].sum())} accepted"
            print(f"[block {event.block} step {event.steps_remaining:3d} row {row} {state}] "
                  f"{tokenizer.decode(canvas.tolist())!r}", flush=True)
    return show


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments {argv[1:]} (flags are --name=value)")
    if (_PROMPT.value is None) == (_PROMPTS_FILE.value is None):
        raise cli.UsageError("give exactly one of --prompt and --prompts_file")
    if (_HF_DIR.value is None) == (_CHECKPOINT.value is None):
        raise cli.UsageError("give exactly one of --hf_dir and --checkpoint")
    if _TEMPLATE.value is not None and _PROMPT.value is None:
        raise cli.UsageError("--template goes with --prompt; in --prompts_file give each prompt a 'template' field")
    if not _BLANK.value:
        raise cli.UsageError("--blank must not be empty")
    try:  # before the model loads: a bad prompts file should not cost a minute of loading
        lines = ([PromptLine(_PROMPT.value, _TEMPLATE.value, "--template")] if _PROMPT.value is not None
                 else read_prompts(_PROMPTS_FILE.value))
    except (OSError, ValueError) as err:
        raise cli.UserError(cli.message_of(err)) from err
    prompts, templates = [line.prompt for line in lines], [line.template for line in lines]
    from diffusion_gemma.checkpoints import loading
    from diffusion_gemma import atomic_write

    if _OUTPUT.value:
        try:  # before any work: an existing answers file is a user's, kept unless --overwrite
            atomic_write.check_new(_OUTPUT.value, overwrite=_OVERWRITE.value)
        except OSError as err:
            raise cli.UserError(str(err)) from None

    loaded = loading.load(hf_dir=_HF_DIR.value, checkpoint=_CHECKPOINT.value, dtype=_DTYPE.value,
                          compute_dtype=_COMPUTE_DTYPE.value)
    task = vocabulary_task(loaded.tokenizer) if loaded.tokenizer else None
    if task:  # ids of a task's data, not text: no tokenizer turns a prompt into them
        source = f"--checkpoint={_CHECKPOINT.value}" if _CHECKPOINT.value else f"--hf_dir={_HF_DIR.value}"
        raise cli.UserError(f"this model's vocabulary is the {task.get('name')} task's {task.get('format')} format, "
                            f"not text; use {task.get('evaluate')} {source}")
    tokenizer_path = _TOKENIZER.value or loaded.tokenizer
    if not tokenizer_path:
        raise cli.UsageError("no tokenizer.json / tokenizer.model ships with the model: pass --tokenizer")
    tokenizer = load_tokenizer(tokenizer_path)
    config = loaded.sampler_config().replace(**sampler_overrides(
        max_new_tokens=_MAX_NEW_TOKENS.value, max_denoising_steps=_MAX_STEPS.value, strategy=_STRATEGY.value,
        entropy_bound=_ENTROPY_BOUND.value, accept_confidence=_ACCEPT_CONFIDENCE.value,
        accept_top_k=_ACCEPT_TOP_K.value, accept_margin=_ACCEPT_MARGIN.value, greedy=_GREEDY.value,
        fixed_steps=_FIXED_STEPS.value))
    for line in lines:  # each template's problem named by where it came from, before any generation
        if line.template is not None:
            try:
                parse_template(tokenizer, line.template, blank=_BLANK.value, max_new_tokens=config.max_new_tokens)
            except ValueError as err:
                where = "--template" if line.where == "--template" else f"{line.where}: template"
                raise cli.UsageError(f"{where}: {err}") from None
    logging.info("jax %s on %s; sampler %s", jax.__version__, jax.devices(), config)
    answers = answer_prompts(loaded.model, tokenizer, prompts, config, chat=_CHAT.value, seed=_SEED.value,
                             batch_size=_BATCH_SIZE.value, on_step=print_steps(tokenizer) if _SHOW_STEPS.value
                             else None, templates=templates, blank=_BLANK.value)
    for index, answer in enumerate(answers):
        if len(answers) > 1:
            print(f"=== prompt {index}: {answer.prompt!r}")
        print(answer.text)
        print(f"--- {len(answer.token_ids)} tokens, {answer.tokens_per_forward:.2f} tokens per forward, "
              f"{answer.denoising_steps} denoising steps, {answer.seconds:.2f} s for its batch "
              f"(the first batch includes compilation)", file=sys.stdout, flush=True)
    if _OUTPUT.value:
        with atomic_write.atomic_path(_OUTPUT.value, overwrite=_OVERWRITE.value) as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                for answer in answers:
                    f.write(json.dumps(dataclasses.asdict(answer)) + "\n")


if __name__ == "__main__":
    from diffusion_gemma.checkpoints.safetensors_dir import CheckpointError
    from diffusion_gemma.config import ConfigError

    cli.run_absl("generate", main, user_errors=(CheckpointError, ConfigError, TokenizerError, OSError))
