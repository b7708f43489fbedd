"""A bounded `endpoint` label for BentoML's request metrics, whatever paths clients ask for.

BentoML's request metrics (bentoml_service_request_total, _duration_seconds and _in_progress, made by its
RunnerTrafficMetricsMiddleware, the outermost layer of BentoML's app) carry `endpoint=<the request's path>`
for every request, 404s included, and the series never go away: each new path adds a counter, a histogram
(a series per bucket) and a gauge to the worker's memory and to the files in BentoML's Prometheus directory, which
every /metrics scrape reads. 31,584 GETs of distinct unknown paths in 75 s grew that directory to 302 MB
and the worker to 2.8 GB, and /metrics then took over 60 s: past a Kubernetes pod's emptyDir limit and
Prometheus's scrape timeout. The /v2 model routes and /static/{name} hold client text in the path too.

So the label takes the values of a fixed set: a path this worker serves keeps its own label, every other
path gets UNKNOWN ("/(unknown)"). KNOWN, each worker's set, is filled once at start-up: our routes without
path parameters and the static files (service.service), BentoML's own routes (BENTOML_PATHS and the files of
its /static_content/ mount); and the served model's /v2 routes, with its name and its version filled in, once
it has loaded (before that they are unknown; any model name gets 503 `loading` then).

BentoML's metrics middleware reads the path once, as the request starts, and nothing runs before it inside
BentoML's app; so the label is set outside the app. LabelPaths wraps the whole app in service.headguard's
protocol: for a path not in KNOWN it keeps the real path and raw_path in the scope (PATH_KEY, RAW_PATH_KEY) and
puts UNKNOWN in their place: one set lookup per request, nothing more for a known path. RestorePath, the first
of our middlewares inside BentoML's app, puts them back in the same scope, so that everything after it (the
router, JsonErrors' 404 naming the path, the /v2 handlers' "no model ..." 404, the /static 404, ApiKey and
HeadLimit) sees the real path. A path no route has still gets our JSON 404, which names it. (The same scope,
not a copy: BentoML's layers have read the path by then, and a mark the protocol sets on the scope later,
middleware.BAD_HTTP_KEY, still reaches BodyGate; tests/service/test_metrics_labels.py checks that the labels
stay bounded on a real server.)

BentoML's access log line reads the path at the same moment, so an unknown path shows there as
`path=/(unknown)` with its 404 (on purpose: the line keeps the status and timing, the client's 404 body names
the real path, and a scan's paths do not fill the log with attacker-chosen text). The OpenTelemetry span
name, when tracing is on, is the label too. Under a bare `bentoml serve` (no headguard protocol) nothing is
relabelled and RestorePath does nothing: the label is the raw path there, as in BentoML.
"""

from __future__ import annotations

from collections.abc import Awaitable, Iterable
from pathlib import Path
from typing import Any

from .middleware import ASGIApp, Receive, Scope, Send

UNKNOWN = "/(unknown)"  # the label of every path not in KNOWN (no route has it: a request for it gets the 404)
PATH_KEY = "pc.path"  # the real path and raw_path, kept in the scope while BentoML's layers see UNKNOWN
RAW_PATH_KEY = "pc.raw_path"
_UNKNOWN_RAW = UNKNOWN.encode()
# BentoML's own routes (bentoml._internal.server.base_app's system routes and its schema); its / and
# /docs.json are ours (service.service mounts its app in front of them).
BENTOML_PATHS = ("/livez", "/healthz", "/readyz", "/metrics", "/schema.json")


class KnownPaths:
    """A worker's set of known paths. Replaced whole when it grows (the model's /v2 paths are added from the
    loading thread), so a request reads one consistent frozenset."""

    def __init__(self, paths: Iterable[str] = ()) -> None:
        self.paths: frozenset[str] = frozenset(paths)

    def add(self, paths: Iterable[str]) -> None:
        self.paths = self.paths | frozenset(paths)


def bentoml_static_paths() -> set[str]:
    """The files of BentoML's /static_content/ mount (Swagger UI's, which GET /docs loads), from its folder;
    none if this BentoML keeps them elsewhere (they are then labelled UNKNOWN, and still served)."""
    try:
        from bentoml._internal import server
    except ImportError:
        return set()
    folder = Path(server.__file__).parent / "static_content"
    return {f"/static_content/{p.name}" for p in folder.iterdir() if p.is_file()} if folder.is_dir() else set()


KNOWN = KnownPaths((*BENTOML_PATHS, *bentoml_static_paths()))  # this worker's; service.service adds ours


def route_paths(routes: Iterable[Any], prefix: str = "", **values: str) -> set[str]:
    """The paths of the Starlette `routes` under `prefix` whose path parameters are all named in `values`,
    with the values filled in (no values: the routes without parameters)."""
    found = set()
    for route in routes:
        template = getattr(route, "path_format", None)
        parameters = getattr(route, "param_convertors", None)
        if (
            isinstance(template, str)
            and parameters is not None
            and template.startswith(prefix)
            and values.keys() >= parameters.keys()
        ):
            found.add(template.format_map(values) if parameters else template)
    return found


class LabelPaths:
    """ASGI wrapper around BentoML's whole app: a path not in `known` becomes UNKNOWN, the real one kept
    in the scope (PATH_KEY, RAW_PATH_KEY) for RestorePath."""

    def __init__(self, app: ASGIApp, known: KnownPaths = KNOWN) -> None:
        self.app = app
        self.known = known

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        if scope["type"] == "http" and scope["path"] not in self.known.paths:
            # In place: a mark the protocol sets on this scope later (middleware.BAD_HTTP_KEY) reaches BodyGate.
            scope[PATH_KEY] = scope["path"]
            scope[RAW_PATH_KEY] = scope.get("raw_path")
            scope["path"] = UNKNOWN
            scope["raw_path"] = _UNKNOWN_RAW
        return self.app(scope, receive, send)


class RestorePath:
    """ASGI middleware, first of ours inside BentoML's app: the real path and raw_path back in the scope."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        real = scope.get(PATH_KEY)
        if real is not None and scope["path"] == UNKNOWN:
            scope["path"] = real
            if scope[RAW_PATH_KEY] is None:
                del scope["raw_path"]
            else:
                scope["raw_path"] = scope[RAW_PATH_KEY]
        return self.app(scope, receive, send)
