"""`manage.py neuronova_poll [--wait SECONDS]`: collect finished MRI jobs (run it from cron or a timer)."""

from __future__ import annotations

import time
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from neuronova_client.client import get_client
from neuronova_client.jobs import poll_running
from neuronova_client.models import Prediction


class Command(BaseCommand):
    help = "Poll the NeuroNova service for running MRI jobs and store finished results for review."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--wait", type=float, default=0.0,
                            help="keep polling (every POLL_INTERVAL_SECONDS) until no job runs or this many "
                                 "seconds have passed; default: one pass")

    def handle(self, *args: Any, wait: float, **options: Any) -> None:
        client = get_client()
        deadline = time.monotonic() + wait
        try:
            while True:
                outcome = poll_running(client)
                running = Prediction.objects.filter(status=Prediction.Status.RUNNING).count()
                self.stdout.write(f"completed {outcome[Prediction.Status.PENDING]}, "
                                  f"failed {outcome[Prediction.Status.FAILED]}, running {running}")
                if not running or time.monotonic() >= deadline:
                    return
                time.sleep(client.config.poll_interval_seconds)
        finally:
            client.close()
