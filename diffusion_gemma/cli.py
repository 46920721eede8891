"""How every command-line tool of the toolkit reports a user's mistake: one line, a meaningful exit code.

A mistake (a misspelled path or key, a file that is not what it should be, a checkpoint that does not exist)
is not a bug, so it gets one line on stderr naming the file, line, key or shape, and no traceback. Exit codes:
2 for usage (bad flags, unknown config keys), 1 for a run that failed, 128 + the signal for a run that SIGINT
(130) or SIGTERM (143) stopped. `--verbose` (or `DIFFUSION_GEMMA_VERBOSE=1`) shows the traceback as well, for a
bug report.

Library code raises its own exception types (all `ValueError` / `OSError` subclasses with a message that
already names the culprit); the CLIs list which of them are the user's and `run_main` turns those into the
line above. absl CLIs go through `run_absl`, whose flag parser replaces absl's flag-help dump and ml_collections'
tracebacks (a missing config file, a failing `get_config`, an override of a key that does not exist) by the
same one line, with the nearest valid spelling suggested.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
import traceback
from typing import Any, Callable, Iterable, NoReturn, Sequence

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
VERBOSE_FLAG = "--verbose"
VERBOSE_ENV = "DIFFUSION_GEMMA_VERBOSE"


class UserError(Exception):
    """A run that cannot go on because of its input (a file, a checkpoint, a config value); exit 1."""

    exit_code = EXIT_FAILED


class UsageError(UserError):
    """Bad flags or config keys; exit 2."""

    exit_code = EXIT_USAGE


def nearest(name: str, candidates: Iterable[str]) -> str | None:
    """The closest valid spelling of `name`, for a "did you mean" hint (None when nothing is close)."""
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return matches[0] if matches else None


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """' (did you mean X?)' or ''."""
    return _hint(nearest(name, candidates))


def _hint(match: str | None) -> str:
    return f" (did you mean {match}?)" if match else ""


def nearest_key(name: str, keys: Iterable[str]) -> str | None:
    """The dotted config key closest to `name`, judged by the last component first: a typo'd key is usually
    right about its section or silent about it, so 'lerning_rate' finds 'optimizer.learning_rate'."""
    keys = list(keys)

    def leaf(key: str) -> str:
        return key.rsplit(".", 1)[-1]

    def similarity(a: str, b: str) -> float:
        return difflib.SequenceMatcher(None, a, b).ratio()

    close_leaves = set(difflib.get_close_matches(leaf(name), {leaf(k) for k in keys}, n=3, cutoff=0.6))
    candidates = [key for key in keys if leaf(key) in close_leaves]
    if not candidates:
        return nearest(name, keys)
    return max(candidates, key=lambda key: (similarity(leaf(name), leaf(key)), similarity(name, key)))


def config_keys(config: Any) -> list[str]:
    """Every dotted key of a nested ConfigDict / dict, sections included ('optimizer', 'optimizer.b1', ...)."""
    keys = []
    for key, value in config.items():
        keys.append(str(key))
        if hasattr(value, "items"):
            keys.extend(f"{key}.{sub}" for sub in config_keys(value))
    return keys


def verbose_requested(argv: Sequence[str] | None = None) -> bool:
    argv = sys.argv if argv is None else argv
    return VERBOSE_FLAG in argv or os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def strip_verbose(argv: Sequence[str]) -> list[str]:
    """argv without the `--verbose` switch (which flag parsers do not know)."""
    return [arg for arg in argv if arg != VERBOSE_FLAG]


def message_of(err: BaseException) -> str:
    """An exception's message for the one line: an OSError as 'path: No such file or directory' rather than
    '[Errno 2] No such file or directory: 'path''."""
    if isinstance(err, OSError) and err.strerror and err.filename is not None:
        return f"{err.filename}: {err.strerror}"
    return str(err)


def report(prog: str, message: str, exit_code: int = EXIT_FAILED) -> int:
    """Print `prog: error: message` (or `usage error`) on one line to stderr; returns `exit_code`."""
    kind = "usage error" if exit_code == EXIT_USAGE else "error"
    one_line = " ".join(str(message).split())
    print(f"{prog}: {kind}: {one_line}", file=sys.stderr, flush=True)
    return exit_code


def fail(prog: str, message: str, exit_code: int = EXIT_FAILED) -> NoReturn:
    """`report` the line and exit."""
    raise SystemExit(report(prog, message, exit_code))


def _fail_verbosely(prog: str, message: str, exit_code: int) -> NoReturn:
    """`fail` from inside an `except` block, with the traceback first under `--verbose`."""
    if verbose_requested():
        traceback.print_exc()
    fail(prog, message, exit_code)


def exit_status(prog: str, main: Callable[[], int | None], *,
                user_errors: tuple[type[BaseException], ...] = (), argv: Sequence[str] | None = None) -> int:
    """`main()`'s exit status; `UserError`s and the listed `user_errors` become one line (with the traceback only
    under `--verbose`) and their exit code, Ctrl-C a one-line 'interrupted' and 130."""
    try:
        return main() or 0
    except (UserError, KeyboardInterrupt, *user_errors) as err:
        if verbose_requested(argv):
            traceback.print_exc()
        if isinstance(err, KeyboardInterrupt):
            print(f"{prog}: interrupted", file=sys.stderr, flush=True)
            return EXIT_INTERRUPTED
        return report(prog, message_of(err), err.exit_code if isinstance(err, UserError) else EXIT_FAILED)


def run_main(prog: str, main: Callable[[], int | None], *, user_errors: tuple[type[BaseException], ...] = (),
             argv: Sequence[str] | None = None) -> NoReturn:
    """Exit with `exit_status(...)`."""
    raise SystemExit(exit_status(prog, main, user_errors=user_errors, argv=argv))


def run_absl(prog: str, main: Callable[[list[str]], int | None], *,
             user_errors: tuple[type[BaseException], ...] = ()) -> NoReturn:
    """`absl.app.run(main)` with flag errors as one line (`parse_absl_flags`) and `main`'s errors as `run_main`
    reports them (absl's own `app.UsageError` included, which `app.run` would answer with the flag help).
    `main(argv)` gets the arguments left after the flags, like under `app.run`. Logging starts at WARNING
    (absl's INFO would show Orbax's every file); `--verbosity=0` brings INFO back."""
    from absl import app, flags, logging

    def absl_main(argv):
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)
        try:
            return main(argv)
        except app.UsageError as err:
            raise UsageError(str(err)) from err

    app.run(lambda argv: run_main(prog, lambda: absl_main(argv), user_errors=user_errors),
            argv=strip_verbose(sys.argv), flags_parser=lambda argv: parse_absl_flags(prog, argv))
    raise AssertionError("unreachable: app.run exits")


def parse_absl_flags(prog: str, argv: list[str]) -> list[str]:
    """`absl.flags.FLAGS(argv)`, but a bad flag, a missing or failing config file and an unknown config key each
    end the program with one line and exit 2 (absl prints "FATAL Flags parsing error" and its flag help;
    ml_collections a traceback or a bare `AttributeError: 'key'`)."""
    from absl import flags

    # ml_collections' DEFINE_config_file flags (their parser's type name; the predicate is not exported)
    config_names = [name for name in flags.FLAGS if flags.FLAGS[name].flag_type() == "config object"]
    for name in config_names:
        _check_config_file(prog, name, _flag_argument(argv, name))
    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        _fail_verbosely(prog, _flag_error_line(str(err)), EXIT_USAGE)
    except SyntaxError as err:  # in a config file
        _fail_verbosely(prog, f"{err.filename}:{err.lineno}: {err.msg}", EXIT_USAGE)
    except (AttributeError, KeyError, IndexError, TypeError, ValueError) as err:  # from applying an override
        message = next(filter(None, (_unknown_override(argv, name) for name in config_names)), None)
        _fail_verbosely(prog, message or f"{type(err).__name__}: {err}", EXIT_USAGE)


def _flag_argument(argv: Sequence[str], name: str) -> str | None:
    """The value given to `--name` (`--name=value` or `--name value`) in `argv`, or None."""
    for index, arg in enumerate(argv):
        for dashes in ("--", "-"):
            if arg.startswith(f"{dashes}{name}="):
                return arg.split("=", 1)[1]
            if arg == f"{dashes}{name}" and index + 1 < len(argv):
                return argv[index + 1]
    return None


def _check_config_file(prog: str, name: str, argument: str | None) -> None:
    """A config file that does not exist: ml_collections would only fail at its first use, with a traceback."""
    if argument is None:
        return
    path = argument.split(":", 1)[0]
    if not path:
        fail(prog, f"--{name} needs a config file (path.py[:variant])", EXIT_USAGE)
    if os.path.isfile(path):
        return
    directory = os.path.dirname(path)
    siblings = ([os.path.join(directory, f) for f in os.listdir(directory or ".") if f.endswith(".py")]
                if os.path.isdir(directory or ".") else [])
    fail(prog, f"--{name}: config file {path} not found{did_you_mean(path, siblings)}", EXIT_USAGE)


def _flag_error_line(message: str) -> str:
    """absl's flag error as one line. A config file whose `get_config` raised arrives as 'flag --config=...:
    Error whilst parsing config file:' plus the traceback: keep the flag and the exception's own message."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if len(lines) > 1 and lines[1].startswith("Traceback"):
        flag = lines[0].split(": ", 1)[0]
        return f"{flag}: {re.sub(r'^[A-Za-z_.]*(Error|Exception): ', '', lines[-1])}"
    return " ".join(lines)


def _unknown_override(argv: Sequence[str], name: str) -> str | None:
    """'unknown config key 'k' (did you mean s.k?)' for the first `--name.k=...` override whose key is not in the
    config, or None. The config is loaded again: ml_collections raised before keeping it."""
    from absl import flags

    argument = _flag_argument(argv, name)
    if argument is None:
        return None
    try:
        keys = config_keys(flags.FLAGS[name].parser.parse(argument))
    except Exception:  # the config itself fails to load: the original error says more
        return None
    overrides = [match.group(1) for arg in argv if (match := re.match(rf"^--?(?:no)?{name}\.([^=]+)", arg))]
    for override in overrides:
        if override not in keys:
            return f"unknown config key {override!r}{_hint(nearest_key(override, keys))}"
    return None
