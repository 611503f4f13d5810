"""Results as tables and figures: the paper's table from MLflow runs, the Pareto front, the
trade-off plot. Imports config and data only (no MLflow: callers hand it the runs)."""
