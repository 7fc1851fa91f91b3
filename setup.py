"""Build the compiled core.

Build switches come from the environment so they work the same under pip,
Docker and CI (pip never passes argv flags to setup.py):

  FASTFEED_DEBUG=1      the core checks its invariants as it runs (heap order,
                        group counts, dirty bits, buffer bounds; docs/core.md),
                        plus bounds checks and line tracing
  FASTFEED_ANNOTATE=1   write the `cython -a` HTML next to the sources
"""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("FASTFEED_DEBUG", "") not in ("", "0")

directives = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": False,
    "initializedcheck": DEBUG,
    "cdivision": True,
    "infer_types": True,
    "embedsignature": True,
}
macros = []
if DEBUG:
    directives["linetrace"] = True
    macros.append(("CYTHON_TRACE_NOGIL", "1"))
    macros.append(("FASTFEED_DEBUG", "1"))
else:
    macros.append(("NDEBUG", "1"))

exts = [
    Extension(
        f"fastfeed.{name}",
        [f"src/fastfeed/{name}.pyx"],
        define_macros=macros,
        extra_compile_args=["-O0", "-g"] if DEBUG else ["-O3"],
    )
    # the core in parts (each cimports the ones before it), then its Python face
    for name in ("_wire", "_table", "_books", "_bars", "_trades", "_delay", "_hub", "_core",
                 "_tickjson")
]

setup(
    ext_modules=cythonize(
        exts,
        compiler_directives=directives,
        annotate=os.environ.get("FASTFEED_ANNOTATE", "") not in ("", "0"),
    )
)
