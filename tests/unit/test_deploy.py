"""The deploy files are valid and speak of metrics dipc really exports.

`promtool check rules` and `promtool test rules` run in CI (.ci/run); these checks need no tool.
"""

from __future__ import annotations

import re
from pathlib import Path

import orjson
import pytest
import yaml

from server.config import Settings
from server.ops.metrics import exported_names

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
METRIC = re.compile(r"\b(dipc_[a-z0-9_]+)")


def dashboard() -> dict:
    return orjson.loads((DEPLOY / "grafana" / "dashboards" / "dipc.json").read_bytes())


def alert_rules() -> list[dict]:
    document = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def test_every_metric_an_alert_names_is_exported():
    named = {name for rule in alert_rules() for name in METRIC.findall(rule["expr"])}
    assert named, "the rules should name dipc metrics"
    assert named <= exported_names(), named - exported_names()


def test_every_metric_a_dashboard_panel_names_is_exported():
    named = {
        name
        for panel in dashboard()["panels"]
        for t in panel["targets"]
        for name in METRIC.findall(t["expr"])
    }
    assert len(named) >= 10
    assert named <= exported_names(), named - exported_names()


def test_the_dashboard_covers_what_ops_watch():
    titles = " ".join(panel["title"].lower() for panel in dashboard()["panels"])
    for topic in ("inquiry latency", "refusals", "notifications", "conflicts", "pool", "webhook"):
        assert topic in titles


def test_the_alerts_cover_what_the_issue_names():
    names = {rule.get("alert") for rule in alert_rules()}
    assert {
        "DipcHighErrorRate",
        "DipcInquiryLatencyBudgetBurnFast",
        "DipcPaymentConflict",
        "DipcPaymentAnomaly",
        "DipcSignatureFailureSpike",
        "DipcNotReady",
        "DipcWebhookBacklog",
    } <= names
    for rule in alert_rules():
        if "alert" in rule:
            assert rule["labels"]["severity"] in ("page", "warning")
            assert rule["annotations"]["summary"]


@pytest.mark.parametrize("path", sorted(str(p.relative_to(DEPLOY)) for p in DEPLOY.rglob("*.y*ml")))
def test_every_yaml_file_parses(path):
    assert list(yaml.safe_load_all((DEPLOY / path).read_text()))


def test_the_kubernetes_deployment_drains_and_probes():
    manifests = {
        doc["kind"]: doc
        for path in (DEPLOY / "k8s").glob("*.yaml")
        for doc in yaml.safe_load_all(path.read_text())
        if doc and "kind" in doc
    }
    assert {
        "Deployment",
        "Service",
        "ConfigMap",
        "Secret",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
    } <= set(manifests)
    pod = manifests["Deployment"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    shutdown = float(manifests["ConfigMap"]["data"]["DIPC_SHUTDOWN_TIMEOUT_S"])
    assert pod["terminationGracePeriodSeconds"] > shutdown + 5  # drain, plus the preStop pause
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_the_image_runs_as_a_user_and_checks_its_health():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^USER (?!root|0\b)\S+", dockerfile, re.MULTILINE)
    assert "HEALTHCHECK" in dockerfile
    assert "/healthz" in dockerfile


def test_the_systemd_unit_gives_the_drain_its_time():
    unit = (DEPLOY / "systemd" / "dipc.service").read_text()
    stop = int(re.search(r"^TimeoutStopSec=(\d+)", unit, re.MULTILINE).group(1))
    assert stop > Settings().shutdown_timeout_s
    assert "RestartPreventExitStatus=2" in unit


def test_every_alert_rule_is_unit_tested_firing_and_quiet():
    """`promtool test rules` (CI) runs alerts_test.yml; here: it covers every alert, both ways."""
    document = yaml.safe_load((DEPLOY / "prometheus" / "alerts_test.yml").read_text())
    fired: set[str] = set()
    quiet: set[str] = set()
    for test in document["tests"]:
        for case in test.get("alert_rule_test", []):
            (fired if case["exp_alerts"] else quiet).add(case["alertname"])
    alerts = {rule["alert"] for rule in alert_rules() if "alert" in rule}
    assert alerts == fired, alerts ^ fired
    assert alerts <= quiet, alerts - quiet
    born_at_one = [
        series["series"]
        for test in document["tests"]
        for series in test["input_series"]
        if series["values"].startswith("_")
    ]
    assert any("dipc_payments_total" in series for series in born_at_one)


def test_every_series_an_increase_alert_watches_is_created_at_start():
    """The labels in `increase(metric{…})` of the money alerts are among those dipc creates at 0."""
    from prometheus_client import CollectorRegistry

    from server.ops import metrics

    metrics.preinitialise(doku_routes=("/doku/inquiry", "/doku/notification"), client_ids=("MCH-1",))
    registry = CollectorRegistry()
    for metric in (metrics.PAYMENTS, metrics.NOTIFICATIONS, metrics.INQUIRIES, metrics.WORKER_RESTARTS):
        registry.register(metric)
    exported = {
        (sample.name, tuple(sorted(sample.labels.items())))
        for family in registry.collect()
        for sample in family.samples
    }
    for labels in ({"kind": "conflict", "reason": "ALREADY_PAID"}, {"kind": "anomaly", "reason": "EXPIRED"}):
        assert ("dipc_payments_total", tuple(sorted(labels.items()))) in exported
    assert ("dipc_notifications_total", (("outcome", "rejected"),)) in exported
    assert ("dipc_worker_restarts_total", ()) in exported
