"""The Grafana dashboard's queries, as the end-to-end test evaluates them against a real Prometheus.

Grafana cannot run here, so its part is done by hand: every panel target's PromQL with the
dashboard's variables replaced by what Grafana would send ($job: the scrape job, $instance: the
"All" value, $__rate_interval: a window that holds several scrapes).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .conftest import DASHBOARD, JOB


@dataclass(frozen=True)
class Query:
    panel: str
    ref_id: str
    expr: str


def load(path: Path = DASHBOARD) -> dict:
    return json.loads(path.read_text())


def panels(dashboard: dict) -> Iterator[dict]:
    """Every panel, including those nested in collapsed rows."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def panel_queries(dashboard: dict) -> list[Query]:
    return [
        Query(panel["title"], target["refId"], target["expr"])
        for panel in panels(dashboard)
        for target in panel.get("targets", [])
    ]


def variables(dashboard: dict) -> dict[str, dict]:
    return {v["name"]: v for v in dashboard["templating"]["list"]}


def concrete(expr: str, dashboard: dict, rate_interval: str) -> str:
    """The PromQL Grafana sends for `expr` with the job selected and instance = All."""
    values = {"__rate_interval": rate_interval, "job": JOB, "instance": variables(dashboard)["instance"]["allValue"]}

    def replace(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise KeyError(f"the dashboard uses ${name}, which the test does not know how to fill in")
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", replace, expr)
