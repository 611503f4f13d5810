"""Training: plain-torch pieces (loop), DeepSpeed (engine), Ray Train (worker, driver)."""
