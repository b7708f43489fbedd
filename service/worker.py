"""One pc-serve worker process: BentoML's worker entry point (supervisor.WORKER_MODULE, what `bentoml serve`
runs in each worker) with uvicorn's protocol bounding the request head as it arrives (service.headguard).

`python -m service.worker SERVICE --fd FD --service-name NAME --worker-id N`: the arguments are BentoML's
worker command's (supervisor.worker_command builds them).
"""

from __future__ import annotations

import importlib
import os
import sys


def main() -> None:
    from uvicorn import config

    from . import metricfiles
    from .supervisor import WORKER_MODULE

    # Before any metric exists: the Prometheus files get their blocks before they are mapped, so a full
    # BENTOML_HOME is an error here or a series left out later, never a SIGBUS (service.metricfiles).
    try:
        metricfiles.install()
    except OSError as exc:
        from .health import _report  # only now: a logger made before BentoML configures logging stays silent

        line = f"cannot make its Prometheus files in {os.environ.get('PROMETHEUS_MULTIPROC_DIR')}: {exc.strerror}"
        _report("failed", line)
        print(f"pc-serve worker: {line}", file=sys.stderr)
        sys.exit(1)

    # BentoML's worker builds uvicorn's Config with the default protocol, "auto": this names ours instead
    # (uvicorn resolves the name when the server starts, after this).
    config.HTTP_PROTOCOLS["auto"] = "service.headguard:BoundedHead"
    importlib.import_module(WORKER_MODULE).main()


if __name__ == "__main__":
    main()
