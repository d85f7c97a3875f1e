"""Evaluation: dataset-wide confusion matrix, mIoU / IoU / mAcc / aAcc, inference modes."""

from __future__ import annotations

from .evaluator import EvalResult, evaluate
from .inference import PAPER_SCALES, InferenceConfig, predict_probs, slide_logits
from .metrics import Scores, format_comparison, format_scores, scores_from_confusion

__all__ = [
    "PAPER_SCALES",
    "EvalResult",
    "InferenceConfig",
    "Scores",
    "evaluate",
    "format_comparison",
    "format_scores",
    "predict_probs",
    "scores_from_confusion",
    "slide_logits",
]
