"""Training: settings, the adaptive loss, patch data, the optimisation step, the Ray Train worker and driver, run identity."""
