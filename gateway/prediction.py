"""The predictor as the gateway uses it: predictor.api when installed, else cold (reactive) predictions."""

from __future__ import annotations

import logging
from typing import Any, Protocol

from gateway.settings import Settings
from predictor.types import Outcome, Prediction, RequestFeatures, Tags

log = logging.getLogger("pythia.predictor")


class PredictorLike(Protocol):
    """The slice of `predictor.api.Predictor` the gateway calls (sync reads and writes, async lifecycle)."""

    def predict(self, tags: Tags, features: RequestFeatures, now: float) -> Prediction: ...

    def observe(self, tags: Tags, features: RequestFeatures, prediction: Prediction, outcome: Outcome) -> None: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def apps(self) -> list[str]: ...

    def model_json(self, app: str) -> dict[str, Any]: ...


class ColdPredictor:
    """No workflow model: every call gets a cold `Prediction` and routing stays reactive."""

    def predict(self, tags: Tags, features: RequestFeatures, now: float) -> Prediction:
        return Prediction(role=tags.agent, workflow=tags.workflow or tags.session)

    def observe(self, tags: Tags, features: RequestFeatures, prediction: Prediction, outcome: Outcome) -> None:
        return None

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def apps(self) -> list[str]:
        return []

    def model_json(self, app: str) -> dict[str, Any]:
        raise KeyError(app)


def make_gateway_predictor(settings: Settings) -> PredictorLike:
    """predictor.api.make_predictor with the gateway's Redis and predictor settings; cold when unavailable."""
    try:
        from predictor.api import make_predictor  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        log.info("predictor.api not available; predictions are cold")
        return ColdPredictor()
    p: PredictorLike = make_predictor(
        redis_url=settings.redis_url, key_prefix=settings.redis_key_prefix, **settings.predictor_options
    )
    return p
