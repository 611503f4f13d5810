"""MLflow: the only `import mlflow` — runs and the tracker, the spool training never waits on,
artifacts and the registry, where weights come from. Imports config, nets, storage."""
