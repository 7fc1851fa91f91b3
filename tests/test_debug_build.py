"""A FASTFEED_DEBUG=1 build of the core checks its own invariants as it runs.

The test builds the debug extensions from a copy of the sources into a
temporary directory (the installed release build is left as it is) and runs
tests/test_core_differential.py against that build in a subprocess: every
pump of every random sequence then also checks heap order, group member
counts, dirty bits against change stamps and frame bounds (docs/core.md).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def debug_build(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A copy of src/ with the debug extensions built into it; returns that src/."""
    top = tmp_path_factory.mktemp("debug-build")
    shutil.copytree(ROOT / "src", top / "src",
                    ignore=shutil.ignore_patterns("*.so", "*.c", "*.html", "__pycache__"))
    # setup.py alone: the build reads its switches from the environment
    shutil.copy(ROOT / "setup.py", top)
    r = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(top / "src"),
         "--parallel", "2"],
        cwd=top, env={**os.environ, "FASTFEED_DEBUG": "1"}, capture_output=True, text=True)
    assert r.returncode == 0, f"debug build failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return top / "src"


def run_on(build: pathlib.Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(build)}
    env.pop("FASTFEED_DEBUG", None)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True)


@pytest.mark.timeout(900)
def test_the_debug_build_is_the_one_loaded(debug_build: pathlib.Path) -> None:
    r = run_on(debug_build, "-c", "import fastfeed._core as c, fastfeed._hub as h; "
               "print(c.DEBUG, h.__file__)")
    assert r.returncode == 0, r.stderr
    debug, where = r.stdout.split()
    assert debug == "True"
    assert pathlib.Path(where).is_relative_to(debug_build)


@pytest.mark.timeout(900)
def test_differential_test_passes_on_the_debug_build(debug_build: pathlib.Path) -> None:
    r = run_on(debug_build, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               str(ROOT / "tests" / "test_core_differential.py"))
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "failed" not in r.stdout


@pytest.mark.timeout(900)
def test_multi_slot_tests_pass_on_the_debug_build(debug_build: pathlib.Path) -> None:
    # the per-slot groups, reverse and watch indexes, sent_ver and frame bounds
    r = run_on(debug_build, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               str(ROOT / "tests" / "test_core_slots.py"))
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "failed" not in r.stdout


@pytest.mark.timeout(900)
def test_the_debug_build_catches_a_broken_invariant(debug_build: pathlib.Path) -> None:
    # a group holding an id the table never handed out: a caller's bug that a
    # release build would carry silently into every frame of that group
    r = run_on(debug_build, "-c", """if True:
        from fastfeed import _core
        table = _core.Table()
        table.apply_tick("A", 1)
        hub = _core.Hub(table)
        hub.capture = []
        cid = hub.add(None, 0, False, 1)
        try:
            hub.subscribe_ids(cid, [5])
        except AssertionError as e:
            print("caught:", e)
        """)
    assert r.returncode == 0, r.stderr
    assert "caught: group 0 holds unknown item 5" in r.stdout
