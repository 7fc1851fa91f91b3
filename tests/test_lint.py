"""The code stays clean: ruff, cython-lint, and the stubs type-check against their users."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run(*cmd: str) -> None:
    # the linters call each other by name: find them next to this interpreter
    env = {**os.environ, "PATH": f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}"}
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stdout + r.stderr


def test_ruff():
    run(sys.executable, "-m", "ruff", "check", "src", "tests", "bench")


def test_cython_lint():
    src = ROOT / "src/fastfeed"
    core = sorted(str(p.relative_to(ROOT)) for p in [*src.glob("*.pyx"), *src.glob("*.pxd")])
    run(str(pathlib.Path(sys.executable).parent / "cython-lint"), *core,
        "bench/loadgen/_client.pyx")


def test_stubs_match_the_compiled_module():
    run(sys.executable, "-m", "mypy.stubtest", "fastfeed._core", "fastfeed._tickjson",
        "--ignore-missing-stub")


def test_python_callers_type_check_against_the_stubs():
    # the whole package by path: an editable install hides it from mypy's
    # import search, so only what is named here is checked the same everywhere
    run(sys.executable, "-m", "mypy", "src/fastfeed", "--ignore-missing-imports")
