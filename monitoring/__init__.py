"""Production monitoring: per-version metrics of what the models see and how clinicians judge them, and input drift
detection against each model card's calibration. Imports `core` only; the pipelines in `api/` report to it."""
