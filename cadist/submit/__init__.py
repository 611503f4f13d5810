"""Jobs on a Ray cluster through its Jobs API: submission, the entry point a submitted job runs,
`cadist status`/`stop`/`logs`. Imports train and sweep (it runs them) and everything below."""
