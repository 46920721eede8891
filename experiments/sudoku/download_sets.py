"""Download the public Sudoku benchmark sets (for evaluation only) and check every file against its sha256.

    python experiments/sudoku/download_sets.py --dest=data/sudoku_sets
    python experiments/sudoku/download_sets.py --dest=data/sudoku_sets --sets=norvig_top95,magictour_top1465
    python experiments/sudoku/download_sets.py --dest=data/sudoku_sets --base_url=https://MIRROR/sudoku

Each set becomes `DEST/<set>.txt` (one puzzle per line, 81 characters, '.' for a blank) and
`DEST/<set>_solutions.txt` (the unique solution on the same line), ready for
`evaluate.py --puzzles=DEST/<set>.txt --solutions=DEST/<set>_solutions.txt`. `benchmark_sets.json` (next to
this script) records where every set comes from and the sha256 of every file.

Where the files come from:
- norvig_easy50, norvig_top95, norvig_hardest11 (Peter Norvig's lists) and magictour_top1465 (Guenter
  Stertenbrink's list): the publishers' plain lists, downloaded from public GitHub copies pinned to a commit
  (dimitri/sudoku and amtal/sudoku; not from the publishers' own web pages), checked against the recorded
  sha256, converted to the format above, solved with the project's solver, and the results checked again.
- royle17_500 (a seeded sample of Gordon Royle's 17-clue list), royle_plus_35to50_400 and rrnstyle_17to34_900
  (built from that list with the Recurrent Relational Network generator) and sudoku_extreme_test_sample496 (a
  sample of the Sudoku-Extreme test split): samples and generated puzzles that cannot be re-derived exactly from
  a publisher's file, so they come only from a mirror of the prepared files (`--base_url`); their checksums still
  pin the content.
With `--base_url` every set is read from the mirror (`BASE/<set>.txt`, `BASE/<set>_solutions.txt`; http(s):// or
file://). No license comes with these lists: evaluate on them, never train on them, do not redistribute them.

A set is written only once both of its files match their checksums, each to a temporary file renamed into
place. An existing file with the expected content is kept; one with other content is never replaced without
`--overwrite`.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import urllib.error
import urllib.request

# Runnable from a checkout without `pip install -e .` (Python puts only this script's directory on sys.path).
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _REPO not in sys.path:
    sys.path.insert(1, _REPO)

from absl import flags  # noqa: E402

from diffusion_gemma import atomic_write, cli  # noqa: E402

MANIFEST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "benchmark_sets.json")
TIMEOUT_S = 60
NEEDS_MIRROR = ("sampled / generated set(s) with no publisher file to rebuild them from; pass --base_url=URL of a "
                "mirror holding the prepared files")

FLAGS = flags.FlagValues()  # this script's own flags: importing it next to another CLI cannot clash
_DEST = flags.DEFINE_string("dest", None, "Directory to write the sets to (created when missing).", flag_values=FLAGS)
_SETS = flags.DEFINE_list("sets", [], "Sets to download, comma-separated (default: every set the source can "
                          "provide: the four publisher lists without --base_url, all of them with it).",
                          flag_values=FLAGS)
_BASE_URL = flags.DEFINE_string("base_url", None, "Mirror holding the prepared <set>.txt and <set>_solutions.txt "
                                "files (http://, https:// or file://).", flag_values=FLAGS)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace existing files whose content differs.",
                               flag_values=FLAGS)


class ChecksumError(cli.UserError):
    """A downloaded or converted file whose sha256 is not the recorded one."""


def load_manifest(path: str = MANIFEST) -> dict:
    """{set name: {description, publisher, files: {file name: sha256}, upstream?: {url, sha256}, ...}}."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)["sets"]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch(url: str, name: str) -> bytes:
    """The bytes at `url` (http, https or file); failures name the set and the URL."""
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            return response.read()
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", None) or err
        raise cli.UserError(f"{name}: cannot download {url}: {reason}") from None


def check(name: str, file_name: str, data: bytes, expected: str, url: str) -> None:
    got = sha256(data)
    if got != expected:
        raise ChecksumError(f"{name}: {file_name} from {url} has sha256 {got}, expected {expected}; nothing of "
                            f"{name} was written")


def from_upstream(raw: bytes) -> tuple[bytes, bytes]:
    """A publisher's list (one 81-cell puzzle per line, '0' or '.' blanks, any line endings, blank lines between)
    as (puzzles, solutions) file contents in our format; the solutions from the project's solver."""
    from diffusion_gemma.tasks.sudoku import puzzles as sudoku

    puzzles = [sudoku.parse_grid(line, source=f"line {number}")
               for number, line in enumerate(raw.decode("ascii").splitlines(), 1) if line.strip()]
    solutions = [sudoku.solve(puzzle) for puzzle in puzzles]
    if any(solution is None for solution in solutions):
        raise ValueError("a puzzle of the list has no solution")
    return ("".join(sudoku.format_grid(p, "compact") + "\n" for p in puzzles).encode(),
            "".join(sudoku.format_grid(s, "compact") + "\n" for s in solutions).encode())


def set_files(name: str, spec: dict, base_url: str | None) -> dict[str, bytes]:
    """{file name: content} for one set, every file checked against the manifest."""
    files = spec["files"]
    if base_url:
        contents = {}
        for file_name, expected in files.items():
            url = f"{base_url.rstrip('/')}/{file_name}"
            contents[file_name] = fetch(url, name)
            check(name, file_name, contents[file_name], expected, url)
        return contents
    upstream = spec.get("upstream")
    if upstream is None:
        raise cli.UsageError(f"{name}: {NEEDS_MIRROR}")
    raw = fetch(upstream["url"], name)
    check(name, os.path.basename(upstream["url"]), raw, upstream["sha256"], upstream["url"])
    puzzles, solutions = from_upstream(raw)
    contents = {f"{name}.txt": puzzles, f"{name}_solutions.txt": solutions}
    if set(contents) != set(files):
        raise ValueError(f"{MANIFEST}: {name} lists files {sorted(files)}, expected {sorted(contents)}")
    for file_name, data in contents.items():
        check(name, f"{file_name} (converted)", data, files[file_name], upstream["url"])
    return contents


def existing(dest: str, spec: dict, overwrite: bool) -> set[str]:
    """The set's files already in `dest` with the expected content; a file with other content is an error
    unless `overwrite`."""
    present = set()
    for file_name, expected in spec["files"].items():
        path = os.path.join(dest, file_name)
        if not os.path.exists(path):
            continue
        with open(path, "rb") as f:
            if sha256(f.read()) == expected:
                present.add(file_name)
            elif not overwrite:
                raise cli.UserError(f"{path} already exists with other content; pass --overwrite to replace it")
    return present


def write_atomic(path: str, data: bytes) -> None:
    """Written beside `path`, then renamed: a reader never sees half a file. `existing` has already refused a
    different file under this name unless --overwrite, so replacing is allowed here."""
    with atomic_write.atomic_path(path, overwrite=True) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def choose(manifest: dict, names: list[str], base_url: str | None) -> list[str]:
    unknown = [n for n in names if n not in manifest]
    if unknown:
        raise cli.UsageError(f"--sets: unknown set {unknown[0]!r}{cli.did_you_mean(unknown[0], manifest)}; the "
                             f"sets: {', '.join(manifest)}")
    if names:
        mirror_only = [n for n in names if "upstream" not in manifest[n]]
        if mirror_only and not base_url:
            raise cli.UsageError(f"{', '.join(mirror_only)}: {NEEDS_MIRROR}")
        return names
    return [n for n in manifest if base_url or "upstream" in manifest[n]]


def run(argv: list[str]) -> list[str]:
    """Parse `argv`, download and check the chosen sets into --dest; returns the paths written."""
    try:
        FLAGS.unparse_flags()
        FLAGS(argv)
    except flags.Error as err:
        raise cli.UsageError(f"{err} (--help lists the flags)") from None
    if not _DEST.value:
        raise cli.UsageError("--dest=DIR is required")
    base_url = _BASE_URL.value
    if base_url and not base_url.startswith(("http://", "https://", "file://")):
        raise cli.UsageError(f"--base_url={base_url}: expected an http://, https:// or file:// URL")
    manifest = load_manifest()
    names = choose(manifest, _SETS.value, base_url)
    dest = _DEST.value
    if os.path.exists(dest) and not os.path.isdir(dest):
        raise cli.UserError(f"--dest={dest} is a file, not a directory")
    os.makedirs(dest, exist_ok=True)
    for name in names:  # before any download: a file in the way stops the run with nothing fetched
        existing(dest, manifest[name], _OVERWRITE.value)
    written = []
    for name in names:
        spec = manifest[name]
        if existing(dest, spec, _OVERWRITE.value) == set(spec["files"]):
            print(f"{name}: already in {dest}, checksums match")
            continue
        for file_name, data in set_files(name, spec, base_url).items():
            path = os.path.join(dest, file_name)
            write_atomic(path, data)
            written.append(path)
        print(f"{name}: wrote {', '.join(os.path.join(dest, f) for f in spec['files'])}", flush=True)
    skipped = [n for n in manifest if n not in names and not _SETS.value]
    if skipped:
        print(f"not downloaded (only from a mirror: --base_url): {', '.join(skipped)}")
    return written


def main(argv: list[str]) -> int:
    """Exit status 0; 1 with one line naming the set and file (download failed, checksum mismatch, a file in the
    way); 2 for bad flags or a set that needs --base_url."""
    if any(arg in ("-h", "--help", "--helpshort") for arg in argv[1:]):
        print(__doc__ + "\n" + FLAGS.get_help())
        return 0

    def download() -> int:
        run(cli.strip_verbose(argv))
        return 0

    try:
        cli.run_main(os.path.basename(argv[0]), download, argv=argv, user_errors=(OSError, ValueError))
    except SystemExit as done:
        return done.code


if __name__ == "__main__":
    sys.exit(main(sys.argv))
