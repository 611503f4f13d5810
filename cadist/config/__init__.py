"""The job schema (pydantic), job files with `--set` overrides, and the parsers the schema needs
(evaluation passes, model names). Imports errors, redact and storage only."""
