"""Build the relay engine from csrc/ when it can be built.

A plain ``pip install .`` must work on a machine without a compiler: the proxy then runs the
pure-Python engine and says so at start-up. A wheel build sets SPLICEGATE_REQUIRE_EXTENSION=1
so a wheel can never ship without the engine.
"""

import os
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

REQUIRE = os.environ.get("SPLICEGATE_REQUIRE_EXTENSION") == "1"
HERE = Path(__file__).parent


def extensions() -> list:
    sources = sorted((HERE / "csrc").glob("*.pyx"))
    if not sources:
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        if REQUIRE:
            raise
        print(
            "WARNING: Cython is missing; splicegate installs without its native engine",
            file=sys.stderr,
        )
        return []
    from setuptools import Extension

    exts = [
        Extension(
            f"splicegate._{src.stem}",
            [str(src.relative_to(HERE))],
            include_dirs=["csrc"],
            extra_compile_args=["-O2"],
        )
        for src in sources
    ]
    return cythonize(exts, language_level=3, compiler_directives={"embedsignature": True})


class OptionalBuildExt(build_ext):
    """Turns a failed compile into a warning unless the extension is required."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:
            self._give_up(exc)

    def build_extension(self, ext) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            self._give_up(exc)

    def _give_up(self, exc: Exception) -> None:
        if REQUIRE:
            raise exc
        print(
            f"WARNING: the native relay engine was not built ({exc}); splicegate will "
            "run its pure-Python engine",
            file=sys.stderr,
        )


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
