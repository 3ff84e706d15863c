"""Block's predictor: the what-if library (``core``) and the side-car service around it."""

from block.predictor.core import LengthPrior, Prediction, Predictor

__all__ = ["LengthPrior", "Prediction", "Predictor"]
