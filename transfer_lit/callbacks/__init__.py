"""Callbacks."""

from transfer_lit.callbacks.epoch_summary import EpochSummary
from transfer_lit.callbacks.fault_tolerance import FaultTolerance
from transfer_lit.callbacks.learning_rates import LearningRates
from transfer_lit.callbacks.prediction_writer import CSVPredictionWriter
from transfer_lit.callbacks.progressive import ProgressiveUnfreezing

__all__ = ["CSVPredictionWriter", "EpochSummary", "FaultTolerance", "LearningRates", "ProgressiveUnfreezing"]
