"""Which build of the per-call Python is loaded: compiled with mypyc (`make compiled`) or interpreted.

`COMPILED_SOURCES` is the one list of modules the opt-in compiled build turns into C extensions
(`setup.py` reads it with `PYTHIA_COMPILE=1`; a plain `pip install -e .` compiles nothing). They are
the modules every request runs through: prefix hashes and index, request features, the routing core
and the predictor. The gateway's I/O modules (fastpath, upstream, metrics, proxy) stay interpreted:
compiled, they were no faster (docs/benchmarks.md, "Gateway overhead"). This module imports nothing
of ours, so `setup.py` can load it without the package's dependencies.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util

COMPILED_SOURCES: tuple[str, ...] = (
    "pools/types.py",
    "pools/prefix_hash.py",
    "pools/prefix_index.py",
    "pools/request_features.py",
    "pools/routing/base.py",
    "pools/routing/kv.py",
    "pools/routing/policies.py",
    "pools/routing/pool_choice.py",
    "pools/routing/priority.py",
    "pools/routing/pythia_hooks.py",
    "pools/routing/reconcile.py",
    "pools/routing/router.py",
    "pools/routing/routing_index.py",
    "pools/routing/sampling.py",
    "pools/routing/filters/healthy.py",
    "pools/routing/filters/kv_capacity.py",
    "pools/routing/pickers/cache_aware.py",
    "pools/routing/pickers/max_score.py",
    "pools/routing/pickers/round_robin.py",
    "pools/routing/pickers/session_hash.py",
    "pools/routing/scorers/gie_kv_utilization.py",
    "pools/routing/scorers/gie_prefix_cache.py",
    "pools/routing/scorers/gie_queue.py",
    "pools/routing/scorers/pythia_placement.py",
    "pools/routing/scorers/queue_depth.py",
    "predictor/api.py",
    "predictor/draw.py",
    "predictor/fingerprint.py",
    "predictor/live.py",
    "predictor/model.py",
    "predictor/sketch.py",
    "predictor/store.py",
    "predictor/types.py",
    "gateway/features.py",
    "gateway/tags.py",
)


def module_name(source: str) -> str:
    """`pools/routing/router.py` -> `pools.routing.router`."""
    return source.removesuffix(".py").replace("/", ".")


def compiled_modules() -> dict[str, bool]:
    """For each module of `COMPILED_SOURCES`, whether the one Python would import is a C extension.

    Looks the modules up without running them (only their parent packages' `__init__` run)."""
    out: dict[str, bool] = {}
    for source in COMPILED_SOURCES:
        spec = importlib.util.find_spec(module_name(source))
        out[module_name(source)] = bool(
            spec is not None and spec.origin and spec.origin.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
        )
    return out


def loaded_build() -> str:
    """`compiled` when every listed module is an extension, `interpreted` when none is, else `mixed`."""
    found = compiled_modules().values()
    if all(found):
        return "compiled"
    return "mixed" if any(found) else "interpreted"
