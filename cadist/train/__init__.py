"""Training: plain-torch pieces (loop), DeepSpeed (engine), Ray Train (worker, driver, checkpoints),
job checks, resume and dry-run plans. Imports eval, cluster, tracking and everything below."""
