"""Study in -> results in the PACS: a real Orthanc (Debian's, DICOMweb plugin, StableAge 2 s, the shipped Lua script)
and the served NeuroNova with the shipped PACS rules, the harness of tests/pacs. The clock starts when the last
instance of a study is stored into Orthanc and stops when all its result series are in the study (Orthanc polled
every 0.1 s): Orthanc's stable-study wait, the notification, QIDO-RS + WADO-RS, the model, the result objects and
STOW-RS.

Run: `BENTOML_HOME=.bentoml-test .venv/bin/python bench/pacs_round_trip.py [--studies 5] [--every-object]`
(`--every-object`: the MR rule also asks for the uncertainty map, 8 model passes). One warm-up study of each kind
first, not counted. Prints each study's time and the median per kind, with the load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from postprocessing.result_sets import DEFAULT_OBJECTS, OBJECTS_OF_MODEL  # noqa: E402
from tests.orthanc import Orthanc, running_orthanc  # noqa: E402
from tests.pacs.conftest import PacsService, Study, ct_study, mr_study, notify_lua  # noqa: E402
from tests.pacs.test_pacs_orthanc import our_series  # noqa: E402
from training_export.demo import ensure_demo_models  # noqa: E402

POLL_S, TIMEOUT_S = 0.1, 300.0


def round_trip(orthanc: Orthanc, study: Study, objects: int) -> float:
    """Seconds from the study stored to its `objects` result series in the study."""
    orthanc.upload(study.files)
    stored = time.monotonic()
    while len(our_series(orthanc, study.uid)) < objects:
        if time.monotonic() - stored > TIMEOUT_S:
            raise TimeoutError(f"no results for study {study.uid} after {TIMEOUT_S:.0f} s")
        time.sleep(POLL_S)
    return time.monotonic() - stored


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--studies", type=int, default=5, help="studies of each kind (after one warm-up each)")
    parser.add_argument("--every-object", action="store_true", help="MR uncertainty map too")
    args = parser.parse_args()
    ensure_demo_models()
    objects = OBJECTS_OF_MODEL if args.every_object else DEFAULT_OBJECTS
    kinds = {"MR": (lambda seed: mr_study(seed=seed), len(objects["mri_segmentation"])),
             "CT": (lambda seed: ct_study(), len(objects["ct_classification"]))}
    with running_orthanc() as orthanc, tempfile.TemporaryDirectory() as state:
        service = PacsService(orthanc, Path(state), every_object=args.every_object)
        service.start()
        notify_lua(orthanc, service)
        try:
            times: dict[str, list[float]] = {kind: [] for kind in kinds}
            for index in range(args.studies + 1):
                for kind, (make, count) in kinds.items():
                    elapsed = round_trip(orthanc, make(100 + index), count)
                    load = os.getloadavg()[0]
                    print(f"{kind} study {index}{' (warm-up)' if index == 0 else ''}: {elapsed:.2f} s, "
                          f"{count} objects, load average {load:.2f}", flush=True)
                    if index:
                        times[kind].append(elapsed)
        finally:
            service.stop()
    for kind, values in times.items():
        print(f"{kind}: median {statistics.median(values):.2f} s, min {min(values):.2f}, max {max(values):.2f} "
              f"over {len(values)} studies")


if __name__ == "__main__":
    main()
