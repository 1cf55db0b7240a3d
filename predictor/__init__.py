"""Workflow predictor: learns each app's agent workflow online and predicts what comes next."""

from predictor.types import NextRole, Outcome, Prediction, RequestFeatures, Tags

__all__ = ["NextRole", "Outcome", "Prediction", "RequestFeatures", "Tags"]
