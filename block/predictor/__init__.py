"""Block's predictor: the what-if library (``core``) and the side-car service around it."""

from block.predictor.calibration import OnlineCalibration, build_predictor
from block.predictor.core import Prediction, Predictor

__all__ = ["OnlineCalibration", "Prediction", "Predictor", "build_predictor"]
