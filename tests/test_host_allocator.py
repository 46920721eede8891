"""The training CLI's re-exec with huge-page malloc: when it applies, what environment the child gets, and that
the CLI really runs with it."""

import os
import subprocess
import sys

import pytest

from diffusion_gemma import host_allocator as ha


@pytest.mark.parametrize("environ, platform, glibc, thp, expected", [
    ({}, "linux", (2, 36), "madvise", True),
    ({}, "linux", (2, 35), "always", True),
    ({}, "linux", (2, 34), "madvise", False),           # the tunable does not exist before 2.35
    ({}, "linux", (), "madvise", False),                # musl and others
    ({}, "linux", (2, 36), "never", False),             # THP disabled: nothing to gain
    ({}, "darwin", (2, 36), "madvise", False),
    ({ha.OPT_OUT: "1"}, "linux", (2, 36), "madvise", False),
    ({ha.TUNABLES: "glibc.malloc.hugetlb=0"}, "linux", (2, 36), "madvise", False),  # the user's choice wins
    ({ha.TUNABLES: "glibc.malloc.arena_max=2"}, "linux", (2, 36), "madvise", True),
])
def test_when_the_cli_reexecutes(environ, platform, glibc, thp, expected):
    assert ha.wants_huge_pages(environ, platform, glibc, thp) is expected


def test_child_environment_keeps_the_users_tunables():
    assert ha.with_huge_pages({"A": "1"}) == {"A": "1", ha.TUNABLES: ha.HUGE_PAGES}
    env = ha.with_huge_pages({ha.TUNABLES: "glibc.malloc.arena_max=2"})
    assert env[ha.TUNABLES] == "glibc.malloc.arena_max=2:" + ha.HUGE_PAGES


def test_this_machine_is_detected():
    if sys.platform != "linux":
        pytest.skip("glibc/THP detection is Linux-only")
    assert ha.glibc_version() == () or ha.glibc_version() >= (2, 0)
    assert ha.transparent_huge_pages() in ("always", "madvise", "never", "")


def test_reexec_replaces_the_process_with_the_tunable_set(tmp_path):
    """A module that calls reexec and prints what it sees: one exec, same PID, tunable set, arguments kept."""
    if not ha.wants_huge_pages({}, sys.platform, ha.glibc_version(), ha.transparent_huge_pages()):
        pytest.skip("no glibc >= 2.35 with transparent huge pages here: the re-exec would not apply")
    (tmp_path / "probe_reexec.py").write_text(
        "import os, sys\n"
        "print('start', os.getpid(), os.environ.get('GLIBC_TUNABLES', ''), flush=True)\n"
        "from diffusion_gemma import host_allocator\n"
        "host_allocator.reexec_with_huge_pages('probe_reexec')\n"
        "print('args', sys.argv[1:], flush=True)\n")
    env = {k: v for k, v in os.environ.items() if k not in (ha.TUNABLES, ha.OPT_OUT)}
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), repo, env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-m", "probe_reexec", "--x=1"], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=60, check=True).stdout.split("\n")
    first, second = out[0].split(" ", 2), out[1].split(" ", 2)
    assert first[0] == second[0] == "start" and first[1] == second[1]  # same process, run twice
    assert first[2] == "" and second[2] == ha.HUGE_PAGES
    assert out[2] == "args ['--x=1']"
