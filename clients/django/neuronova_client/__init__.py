"""NeuroNova for Django: calls the NeuroNova inference service with BentoML's HTTP client and keeps its results
for doctor review.

`INSTALLED_APPS += ["neuronova_client"]`, a `NEURONOVA` settings dict (`conf.ClientSettings`), the app's URLs,
and `manage.py neuronova_poll` (cron or a systemd timer) to collect finished MRI segmentations.
"""
