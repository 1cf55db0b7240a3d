"""Workflow predictor: learns each app's agent workflow online and predicts what comes next.

`make_predictor(redis_url, key_prefix, **settings)` gives a `Predictor` (memory or Redis store);
see predictor/README.md. `Predictor` and `make_predictor` load lazily, so modules that only need
the plain types (pools) do not import the predictor itself.
"""

from typing import Any

from predictor.types import NextRole, Outcome, Prediction, RequestFeatures, Tags

__all__ = ["NextRole", "Outcome", "Prediction", "Predictor", "RequestFeatures", "Tags", "make_predictor"]


def __getattr__(name: str) -> Any:
    if name in ("Predictor", "make_predictor"):
        from predictor import api

        return getattr(api, name)
    raise AttributeError(f"module 'predictor' has no attribute {name!r}")
