"""Evaluation: batched, resumable generation (`run`) and metrics with uncertainty (`metrics`)."""

from echoink.eval.run import evaluate, evaluate_loaded, training_evaluator

__all__ = ["evaluate", "evaluate_loaded", "training_evaluator"]
