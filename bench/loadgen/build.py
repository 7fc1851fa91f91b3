"""Build the compiled load client in place: python -m bench.loadgen.build

bench/setup.sh runs it. Needs Cython and picows (whose .pxd it cimports).
"""

import os
import shutil
import sys
import tempfile

from Cython.Build import cythonize
from setuptools import Extension
from setuptools.dist import Distribution

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> int:
    os.chdir(HERE)  # away from the project's pyproject.toml
    ext = Extension(
        "_client",
        ["_client.pyx"],
        extra_compile_args=["-O3", "-Wno-unused-function"],
    )
    with tempfile.TemporaryDirectory() as tmp:
        dist = Distribution({
            "name": "fastfeed-bench-loadgen",
            "ext_modules": cythonize([ext], quiet=True, compiler_directives={"language_level": 3}),
        })
        cmd = dist.get_command_obj("build_ext")
        cmd.inplace = True
        cmd.build_temp = tmp
        dist.run_command("build_ext")
    shutil.rmtree(os.path.join(HERE, "build"), ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
