"""pc-serve: check the settings and the checkpoint, then run the BentoML server (PCEncoder).

Flags win over PC_* environment variables, which win over the defaults. A bad setting or a bad or
missing checkpoint ends here with one line on stderr and exit status 2, before any server starts.
pc-serve then supervises the BentoML worker processes (service.supervisor): it restarts a worker that
dies, stops with exit status 1 and the worker's one-line error when workers fail to start
MAX_START_FAILURES times in a row, and on SIGTERM stops listening and lets the requests in flight
finish before it exits. Once the first worker is ready it prints one line with the URL.

Signals: SIGTERM or SIGINT (Ctrl-C) stops pc-serve gracefully, exit status 0, as soon as main() has started
(Kubernetes sends SIGTERM whenever a pod goes, also right after it started), so this module imports nothing
heavy (torch, BentoML) before main() has taken the signals over. One that comes before the workers start is
noted, the check under way finishes (an exception raised inside an import of torch or numpy breaks it), and
pc-serve stops without starting any worker. A second SIGINT while a worker is still draining (Ctrl-C twice)
is a forced stop: the requests in flight are cut off and pc-serve exits 130 (see service.supervisor).
`--check` keeps Python's default signal handling.

Exit statuses: 0 stopped by a signal (drained, or before any worker started) or `--check` passed; 1 workers
failed to start; 2 a bad setting or checkpoint, the port taken, or a BENTOML_HOME that is not writable or has
less than supervisor.MIN_FREE_BYTES (16 MiB) free; 130 a forced stop.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported in main(), after the signals are taken over: settings imports torch (seconds)
    from .settings import Settings

logger = logging.getLogger(__name__)

SERVICE = "service.service:PCEncoder"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class _EarlyStop:
    """pc-serve's SIGTERM/SIGINT handler until the supervisor takes the signals over: notes the first signal."""

    def __init__(self) -> None:
        self.signal: str | None = None

    def __call__(self, signum: int, frame: object) -> None:
        if self.signal is None:
            self.signal = signal.Signals(signum).name
            logger.info("%s while starting: stopping before any worker starts", self.signal)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="pc-serve",
        description="Serve the predictive-coding image encoder over HTTP (BentoML). Every setting also reads "
        "from a PC_* environment variable (see the README); flags win.",
    )
    parser.add_argument("--model", help="checkpoint path or model name (PC_MODEL; default: default = conv-rgb)")
    parser.add_argument("--host", help="address to bind (PC_HOST; default: 0.0.0.0)")
    parser.add_argument("--port", type=int, help="port (PC_PORT; default: 3000)")
    parser.add_argument("--workers", type=int, help="worker processes, each with a model copy (PC_WORKERS; default: 1)")
    parser.add_argument(
        "--allow-unstable",
        action="store_true",
        default=None,
        help="serve a checkpoint whose k1 is above its stability bound (PC_ALLOW_UNSTABLE)",
    )
    parser.add_argument("--check", action="store_true", help="only check the settings and the checkpoint, then exit")
    return parser.parse_args(argv)


def check(settings: Settings) -> str:
    """Load the checkpoint as the service will; returns a one-line description. Raises on a bad model."""
    import pcmodel

    model = pcmodel.load(settings.model, allow_unstable=settings.allow_unstable)
    return f"{model.name} (sha256 {model.sha256[:12]}) from {settings.model}"


def resolve_model(model: str) -> str:
    """A checkpoint path made absolute against the user's directory (the workers run elsewhere)."""
    import pcmodel

    if model in pcmodel.shipped_models() and not Path(model).is_file():
        return model  # a model name
    return str(Path(model).expanduser().absolute())


def _writable(variable: str, default: Path) -> Path:
    from .settings import SettingsError

    path = Path(os.environ.get(variable) or default).expanduser().absolute()  # the workers run elsewhere
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise SettingsError(
            f"{variable}={path} is not a writable directory ({exc.strerror}); point it at one"
        ) from None
    return path


def _room(home: Path) -> None:
    """SettingsError unless BENTOML_HOME has MIN_FREE_BYTES free, counting the Prometheus files of an earlier
    run that the supervisor removes at start (a full disk there killed every worker with SIGBUS)."""
    from .settings import SettingsError
    from .supervisor import MIN_FREE_BYTES, free_bytes

    free = free_bytes(home)
    old = home / "prometheus_multiproc_dir"
    if free < MIN_FREE_BYTES and old.is_dir():
        free += sum(p.stat().st_blocks * 512 for p in old.iterdir() if p.is_file())
    if free < MIN_FREE_BYTES:
        raise SettingsError(
            f"BENTOML_HOME={home} has {free} bytes free, less than the {MIN_FREE_BYTES} ({MIN_FREE_BYTES >> 20} MiB) "
            "pc-serve needs for BentoML's state and the workers' Prometheus files; free space there or give it a "
            "larger volume"
        )


def public_url(host: str, port: int) -> str:
    """The URL a local browser reaches the service at (all addresses: localhost)."""
    if host in ("0.0.0.0", "::", ""):
        host = "localhost"
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.check:
        return _serve(args, None)
    # Taken over before anything slow (the imports, the checkpoint's check): a signal from now on is a clean stop.
    early = _EarlyStop()
    previous = {sig: signal.signal(sig, early) for sig in STOP_SIGNALS}
    try:
        return _serve(args, early)
    finally:
        for sig, handler in previous.items():
            if early.signal is None and signal.getsignal(sig) is early:  # nothing ran (a bad setting)
                signal.signal(sig, handler)  # the caller's handlers back
            else:  # pc-serve served or was stopped, and is exiting: a signal now (a second Ctrl-C) must not end
                signal.signal(sig, signal.SIG_IGN)  # it by that signal (Python resets its handlers as it shuts down)


def _serve(args: argparse.Namespace, early: _EarlyStop | None) -> int:
    """pc-serve after its arguments: `early` is the signal handler main() installed (None with --check)."""

    def stopped() -> bool:  # a signal came before the supervisor took the signals over
        return early is not None and early.signal is not None

    from .settings import Settings
    from .supervisor import StartFailed, Supervisor, WorkerModuleChanged, check_worker_module

    try:
        settings = Settings.from_env(
            model=args.model, host=args.host, port=args.port, workers=args.workers, allow_unstable=args.allow_unstable
        )
        settings = dataclasses.replace(settings, model=resolve_model(settings.model))
        if settings.api_key_file:  # the workers run elsewhere
            settings = dataclasses.replace(settings, api_key_file=str(Path(settings.api_key_file).absolute()))
        settings.secret()  # an unreadable PC_API_KEY_FILE stops here, not in every worker
        # BentoML keeps its state and Prometheus files under BENTOML_HOME, uploads under TMPDIR: with a
        # read-only root filesystem both must point at writable mounts.
        home = _writable("BENTOML_HOME", Path.home() / "bentoml")
        _room(home)
        tmp = _writable("TMPDIR", Path(tempfile.gettempdir()))
        if stopped():
            return 0
        description = check(settings)
        if stopped():
            return 0
        check_worker_module()
    except (
        ValueError,
        OSError,
        WorkerModuleChanged,
    ) as exc:  # settings, checkpoint and config errors are all ValueErrors
        print(f"pc-serve: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(f"pc-serve: ok: {description}")
        return 0
    if stopped():
        return 0
    logger.info(
        "serving %s on http://%s:%d with %d worker(s)", description, settings.host, settings.port, settings.workers
    )
    env = {**os.environ, **settings.to_env(), "BENTOML_HOME": str(home), "TMPDIR": str(tmp)}
    env.setdefault("BENTOML_DO_NOT_TRACK", "true")  # no usage reports leave the machine unless asked for
    # glibc gives each thread that mallocs an arena (up to 8 per core) and keeps their freed pages:
    # after 20 concurrent large decodes a worker held 84 MiB more 10 s later with the default, 5 MiB
    # with 2 arenas (docs/RELIABILITY.md).
    env.setdefault("MALLOC_ARENA_MAX", "2")
    root = str(Path(__file__).resolve().parent.parent)  # where `service` imports from

    def announce() -> None:  # one line for whoever started pc-serve: where to point a browser
        url = public_url(settings.host, settings.port)
        print(f"pc-serve: ready at {url} (explorer page; API at /encode)", flush=True)

    try:
        supervisor = Supervisor(
            SERVICE, root, settings.host, settings.port, settings.workers, env, home, on_ready=announce
        )
    except OSError as exc:
        print(f"pc-serve: cannot listen on {settings.host}:{settings.port}: {exc.strerror}", file=sys.stderr)
        return 2
    if stopped():  # before the supervisor took the signals over: it starts no worker, and returns 0
        supervisor.stopping = True
    try:
        return supervisor.run()
    except StartFailed as exc:
        print(f"pc-serve: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
