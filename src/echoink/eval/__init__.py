"""Evaluation, one module per job: `run` (whole runs: `evaluate`, `evaluate_loaded`, `training_evaluator`),
`generation` (the loop through the rollout engine), `grading` (a row per answer), `run_files` (predictions
file, run signature, weights fingerprint), `metrics` (the summary, intervals, paired tests), `metrics_table`,
`protocols`. Nothing is imported here, so `echoink.eval.metrics` and `echoink.eval.run_files` load no model
code (analysis reads them)."""
