"""Judging a trained model beyond accuracy: calibration (ECE, temperature scaling), decision thresholds, and the
stored predictions both are fitted on (:class:`Decision`)."""

from transfer_lit.evaluation.calibration import (
    TopLabelECE,
    expected_calibration_error,
    fit_temperature,
    reliability_bins,
)
from transfer_lit.evaluation.decision import Decision, PredictionStore
from transfer_lit.evaluation.thresholds import choose_threshold, parse_threshold_rule

__all__ = [
    "Decision",
    "PredictionStore",
    "TopLabelECE",
    "choose_threshold",
    "expected_calibration_error",
    "fit_temperature",
    "parse_threshold_rule",
    "reliability_bins",
]
