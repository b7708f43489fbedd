"""Settings for every test: no telemetry from BentoML, no network at run time."""

from __future__ import annotations

import os

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
