"""Build hook: pyproject.toml holds the metadata; this only adds the opt-in compiled build.

With `PYTHIA_COMPILE=1` (`make compiled`, deploy/Dockerfile), mypyc compiles the per-call modules
listed in `pools/build_info.py` to C extensions: same source, same decisions, fewer interpreter
cycles per request. Without it (`pip install -e .`, `make test`) the package stays pure Python.
mypyc type-checks against the packages installed where pip runs: install the dependencies first
(`make compiled` builds with the dev venv's pip; the Dockerfile installs the pure package first).
"""

import os
import runpy

from setuptools import setup

ext_modules = []
setup_requires = []
if os.environ.get("PYTHIA_COMPILE") == "1":
    # pip's isolated build environment gets mypy from this (`make compiled` pins the dev venv's
    # version, the Dockerfile its own): pip first asks for the build requirements, then builds
    setup_requires = [os.environ.get("PYTHIA_MYPY_REQUIREMENT", "mypy")]
    try:
        from mypyc.build import mypycify
    except ImportError:  # the requirements query, before mypy is installed
        pass
    else:
        sources = runpy.run_path(os.path.join("pools", "build_info.py"))["COMPILED_SOURCES"]
        # one shared library for all of them, so calls between the compiled modules stay native
        ext_modules = mypycify(list(sources), opt_level="3")

setup(ext_modules=ext_modules, setup_requires=setup_requires)
