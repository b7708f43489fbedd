"""One pc-serve worker process: BentoML's worker entry point (supervisor.WORKER_MODULE, what `bentoml serve`
runs in each worker) with uvicorn's protocol bounding the request head as it arrives (service.headguard).

`python -m service.worker SERVICE --fd FD --service-name NAME --worker-id N`: the arguments are BentoML's
worker command's (supervisor.worker_command builds them).
"""

from __future__ import annotations

import importlib


def main() -> None:
    from uvicorn import config

    from .supervisor import WORKER_MODULE

    # BentoML's worker builds uvicorn's Config with the default protocol, "auto": this names ours instead
    # (uvicorn resolves the name when the server starts, after this).
    config.HTTP_PROTOCOLS["auto"] = "service.headguard:BoundedHead"
    importlib.import_module(WORKER_MODULE).main()


if __name__ == "__main__":
    main()
