"""Callbacks."""

from transfer_lit.callbacks.prediction_writer import CSVPredictionWriter

__all__ = ["CSVPredictionWriter"]
