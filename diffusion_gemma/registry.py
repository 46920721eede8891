"""Name -> implementation tables through which tasks plug into the core: data sources, training-time
evaluators and model presets.

The core registers its own generic entries (the `synthetic` and `chat_jsonl` sources, the `samples` evaluator,
the `tiny` and `gemma4_26b_a4b` presets, in `CORE_MODULES`) and never imports a task. A task is a package under
`diffusion_gemma.tasks` (found by walking that package) or any module named in the `diffusion_gemma.tasks`
entry-point group of an installed distribution; importing it registers its entries. Tasks are imported the
first time a name is not found, so a config that names no task loads none.

This module imports nothing from the library: every layer may use it.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import pkgutil
from typing import Any, Callable, Generic, Mapping, TypeVar

TASKS_PACKAGE = "diffusion_gemma.tasks"
# The core modules that register the generic entries, imported (by name) before a lookup gives up.
CORE_MODULES = ("diffusion_gemma.config", "diffusion_gemma.data.pipeline", "diffusion_gemma.training.evaluation")
ENTRY_POINT_GROUP = "diffusion_gemma.tasks"

T = TypeVar("T")


class RegistryError(ValueError):
    """An unknown name, or a name registered twice; the message lists the valid names."""


class Registry(Generic[T]):
    """One table. `get(name)` loads the tasks before giving up, so a task's names work without importing it."""

    def __init__(self, what: str):
        self.what = what
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        if name in self._entries and self._entries[name] is not entry:
            raise RegistryError(f"{self.what} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def get(self, name: str, *, where: str = "") -> T:
        if name not in self._entries:
            load_tasks()
        if name not in self._entries:
            prefix = f"{where} = " if where else f"{self.what} "
            raise RegistryError(f"{prefix}{name!r} is not a known {self.what}; valid: {self.names()}")
        return self._entries[name]

    def names(self) -> list[str]:
        load_tasks()
        return sorted(self._entries)


def check_options(options: Mapping[str, Any], fields_of: type, *, where: str) -> Any:
    """A task's `options` mapping -> its frozen dataclass; unknown keys name `where` and the valid keys."""
    valid = {field.name for field in dataclasses.fields(fields_of)}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise RegistryError(f"unknown key(s) {[f'{where}.{key}' for key in unknown]}; valid keys of '{where}': "
                            f"{sorted(valid)}")
    try:
        return fields_of(**options)
    except (TypeError, ValueError) as err:
        raise RegistryError(f"{where}: {err}") from None


def no_options(options: Mapping[str, Any], *, where: str) -> None:
    if options:
        raise RegistryError(f"{where} takes no options, got {sorted(options)}")


@dataclasses.dataclass(frozen=True)
class DataSource:
    """`build(data_config, tokenizer)` -> an example source (`__len__`, `__getitem__` -> `SftExample`);
    `check(options, where=...)` validates `data.options` when the config is read; `own_tokenizer(data_config)`
    is the tokenizer the task's vocabulary defines (None: the run's text tokenizer); `renders_text(data_config)`
    says whether the source needs a text tokenizer."""

    build: Callable[[Any, Any], Any]
    check: Callable[..., Any] = no_options
    own_tokenizer: Callable[[Any], Any] = lambda data_config: None
    renders_text: Callable[[Any], bool] = lambda data_config: False


@dataclasses.dataclass(frozen=True)
class EvaluatorKind:
    """`build(evaluation_config, data_config, tokenizer, workdir)` -> an evaluator
    `(model, step, should_stop) -> {name: float} | None`, or raises ValueError naming the missing setting;
    `check(options, where=...)` validates `evaluation.options` when the config is read."""

    build: Callable[[Any, Any, Any, str], Callable]
    check: Callable[..., Any] = no_options


DATA_SOURCES: Registry[DataSource] = Registry("data source")
EVALUATORS: Registry[EvaluatorKind] = Registry("evaluation kind")
MODEL_PRESETS: Registry[Callable[..., Any]] = Registry("model preset")

_loaded = False


def load_tasks() -> None:
    """Import every registering module once: the core's own, the subpackages of `diffusion_gemma.tasks`, then
    the entry-point modules."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for name in CORE_MODULES:
        importlib.import_module(name)
    package = importlib.import_module(TASKS_PACKAGE)
    for module in pkgutil.iter_modules(package.__path__, prefix=f"{TASKS_PACKAGE}."):
        importlib.import_module(module.name)
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        importlib.import_module(entry_point.value.split(":")[0])
