"""deploy/grafana: the dashboard JSON and the provisioning files, checked structurally (Grafana cannot
run here; every panel's query is evaluated against a real Prometheus by test_monitoring_e2e.py)."""

from __future__ import annotations

import re

import yaml

from . import dashboard as dash
from .conftest import DASHBOARD, DEPLOY, GRAFANA, PROMETHEUS

# What the issue asks the dashboard to show, and a metric each such panel must query.
REQUIRED_PANELS = {
    "request rate": "bentoml_service_request_total",
    "p50/p95/p99 latency": "bentoml_service_request_duration_seconds_bucket",
    "inference time per batch": "pc_inference_duration_seconds",
    "iterations per image": "pc_inference_iterations",
    "batch size": "pc_batch_size",
    "final energy": "pc_final_energy",
    "error rate by reason": "pc_request_errors_total",
    "model info": "pc_model_info",
    "memory budgets in flight": "pc_inflight_bytes",
    "memory budget capacity": "pc_budget_limit_bytes",
    "v2 REST calls": "pc_v2_rest_requests_total",
    "v2 REST latency": "pc_v2_rest_request_duration_seconds_bucket",
    "gRPC calls": "pc_grpc_requests_total",
    "gRPC latency": "pc_grpc_request_duration_seconds_bucket",
}


def test_dashboard_is_a_grafana_dashboard():
    board = dash.load()
    assert board["uid"] == "pc-encoder" and board["title"] and isinstance(board["schemaVersion"], int)
    ids = [panel["id"] for panel in dash.panels(board)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    allowed = {"row", "timeseries", "stat", "table", "text", "gauge", "bargauge", "heatmap"}
    for panel in dash.panels(board):
        assert panel["type"] in allowed, panel["type"]
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24 and grid["h"] >= 1
        if panel["type"] not in {"row", "text"}:
            assert panel["targets"], f"panel {panel['title']!r} has no query"
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert all(t["datasource"] == panel["datasource"] for t in panel["targets"])
            assert panel.get("description"), f"panel {panel['title']!r} has no description"


def test_panels_do_not_overlap():
    cells: dict[tuple[int, int], str] = {}
    for panel in dash.panels(dash.load()):
        grid = panel["gridPos"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]


def test_dashboard_shows_what_the_issue_asks_for():
    queries = dash.panel_queries(dash.load())
    for what, metric in REQUIRED_PANELS.items():
        assert any(metric in q.expr for q in queries), f"no panel shows {what} ({metric})"
    latency = [q.expr for q in queries if "bentoml_service_request_duration_seconds_bucket" in q.expr]
    assert {re.search(r"histogram_quantile\((0\.\d+)", e).group(1) for e in latency} >= {"0.5", "0.95", "0.99"}


def test_every_query_is_selected_by_the_dashboard_variables():
    board = dash.load()
    names = set(dash.variables(board))
    assert {"datasource", "job", "instance"} <= names
    for query in dash.panel_queries(board):
        assert 'job=~"$job"' in query.expr and 'instance=~"$instance"' in query.expr, query
        assert "[$__rate_interval]" in query.expr or "rate(" not in query.expr, query
        dash.concrete(query.expr, board, "1m")  # every variable it uses can be filled in


def every_expr(node) -> list[str]:
    """Every "expr" anywhere in the JSON, found without knowing Grafana's layout."""
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "expr"] + [e for v in node.values() for e in every_expr(v)]
    if isinstance(node, list):
        return [e for v in node for e in every_expr(v)]
    return []


def test_every_panel_query_is_one_the_end_to_end_test_evaluates():
    """test_monitoring_e2e evaluates dash.panel_queries() against a real Prometheus: that list must
    hold every query in the file, found here by an independent walk over the whole JSON."""
    board = dash.load()
    assert sorted(q.expr for q in dash.panel_queries(board)) == sorted(every_expr(board))
    from . import test_monitoring_e2e

    assert test_monitoring_e2e.DASHBOARD_QUERIES is dash.panel_queries


def test_provisioning_points_at_the_dashboard_and_the_prometheus_of_the_stack():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    grafana = compose["services"]["grafana"]
    mounts = dict(volume.split(":")[:2] for volume in grafana["volumes"] if volume.startswith("./"))
    provisioning = mounts["./grafana/provisioning"]
    assert provisioning == "/etc/grafana/provisioning"

    (provider,) = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "pc-encoder.yaml").read_text())["providers"]
    assert provider["type"] == "file"
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert (GRAFANA / "dashboards" / DASHBOARD.name).exists()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"

    (source,) = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text())[
        "datasources"
    ]
    assert source["type"] == "prometheus" and source["isDefault"] is True
    prometheus = compose["services"]["prometheus"]
    container_port = prometheus["ports"][0].split(":")[-1]
    assert source["url"] == f"http://prometheus:{container_port}"
    scrape_interval = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())["global"]["scrape_interval"]
    assert source["jsonData"]["timeInterval"] == scrape_interval
    # The dashboard's datasource variable offers Prometheus sources, the provisioned one among them.
    assert dash.variables(dash.load())["datasource"]["query"] == source["type"]


def test_integer_histograms_show_their_exact_mean_and_call_quantiles_estimates():
    """Steps per image and batch sizes are whole numbers; histogram_quantile interpolates inside a bucket, so a p95
    reads between its bounds (batches of 1 read 0.95 with a lowest bound of 1). The mean (_sum / _count) is
    exact: each such panel shows it, and names its quantiles estimates."""
    board = dash.load()
    for metric in ("pc_inference_iterations", "pc_batch_size"):
        (panel,) = [p for p in dash.panels(board) if any(f"{metric}_bucket" in t["expr"] for t in p.get("targets", []))]
        exprs = {t["legendFormat"]: t["expr"] for t in panel["targets"]}
        assert f"{metric}_sum" in exprs["mean"] and f"{metric}_count" in exprs["mean"]
        quantiles = [legend for legend, expr in exprs.items() if "histogram_quantile" in expr]
        assert quantiles and all("estimate" in legend for legend in quantiles), quantiles
        assert "estimate" in panel["description"] and "within 0.5" in panel["description"]
