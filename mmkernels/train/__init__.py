"""Training, evaluation and prediction (CLI: mmkernels-train / -eval / -predict, or python -m mmkernels.train)."""
