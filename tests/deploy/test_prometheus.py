"""deploy/prometheus: the scrape config and the alert rules, checked by promtool (Debian's prometheus
package), the rules' unit tests run by `promtool test rules`, and every alert covered and documented."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from .conftest import PROMETHEUS, ROOT, require_tool, run

ALERTS = PROMETHEUS / "alerts.yml"
ALERT_TESTS = PROMETHEUS / "alerts.test.yml"


def alert_rules() -> list[dict]:
    return [
        rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"] if "alert" in rule
    ]


def test_promtool_checks_the_config_and_its_rule_files():
    output = run([require_tool("promtool"), "check", "config", str(PROMETHEUS / "prometheus.yml")]).stdout
    assert "SUCCESS" in output and "1 rule files found" in output


def test_promtool_checks_the_rules():
    output = run([require_tool("promtool"), "check", "rules", str(ALERTS)]).stdout
    assert f"SUCCESS: {len(alert_rules())} rules found" in output


def test_promtool_runs_the_rule_unit_tests():
    output = run([require_tool("promtool"), "test", "rules", str(ALERT_TESTS)], cwd=PROMETHEUS).stdout
    assert "SUCCESS" in output


def test_promtool_unit_tests_can_fail(tmp_path):
    """A wrong expectation makes `promtool test rules` fail: the unit tests assert something."""
    promtool = require_tool("promtool")
    shutil.copy(ALERTS, tmp_path / "alerts.yml")
    broken = ALERT_TESTS.read_text().replace("9.95s", "9.9s", 1)
    assert broken != ALERT_TESTS.read_text()
    (tmp_path / "alerts.test.yml").write_text(broken)
    result = subprocess.run(
        [promtool, "test", "rules", "alerts.test.yml"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0 and "PCEncoderLatencySLOBreach" in result.stdout + result.stderr


def test_every_alert_fires_in_a_unit_test_and_stays_quiet_in_another():
    fired, quiet = set(), set()
    for case in yaml.safe_load(ALERT_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (fired if check["exp_alerts"] else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names <= fired, f"alerts never shown to fire: {sorted(names - fired)}"
    assert names <= quiet, f"alerts never shown to stay quiet: {sorted(names - quiet)}"


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda rule: rule["alert"])
def test_alert_has_severity_summary_description_and_a_runbook_entry(rule):
    assert rule["labels"]["severity"] in {"critical", "warning"}
    assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    assert 'job="pc-encoder"' in rule["expr"], "every alert is scoped to the service's job"
    deploy_doc = (ROOT / "docs" / "DEPLOY.md").read_text()
    assert f"`{rule['alert']}`" in deploy_doc, f"docs/DEPLOY.md does not say what {rule['alert']} means"
