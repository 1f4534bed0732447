"""The deployment files under deploy/, each checked: the alert rules by promtool's own unit tests,
the dashboard's and the rules' metric names against what a running bon exports, the Kubernetes
manifests against the Kubernetes schemas, and the compose file's wiring.

promtool comes with Debian's `prometheus` package; absent it, its tests skip, unless
BON_REQUIRE_TOOLS=1 (CI) makes that a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import API_KEYS

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
# A bon metric name in a PromQL expression (recording rules are named bon:..., not bon_...).
METRIC = re.compile(r"\bbon_[a-z0-9_]+")


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        message = "promtool is not installed (apt-get install prometheus)"
        if os.environ.get("BON_REQUIRE_TOOLS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return found


def test_alert_rules_pass_promtools_checks_and_unit_tests():
    tool = promtool()
    checked = subprocess.run(
        [tool, "check", "rules", str(DEPLOY / "prometheus/alerts.yml")], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run(
        [tool, "test", "rules", "alerts_test.yml"], capture_output=True, text=True, cwd=DEPLOY / "prometheus"
    )
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


def test_the_alerts_cover_what_the_fleet_needs():
    rules = yaml.safe_load((DEPLOY / "prometheus/alerts.yml").read_text())
    alerts = {rule["alert"] for group in rules["groups"] for rule in group["rules"] if "alert" in rule}
    assert {"BonEngineDead", "BonLogBehind", "BonHigh5xxRatio", "BonHighP99Latency", "BonRewardDrift",
            "BonNoRetrain"} <= alerts  # fmt: skip
    tests = yaml.safe_load((DEPLOY / "prometheus/alerts_test.yml").read_text())
    tested = {
        case["alertname"] for test in tests["tests"] for case in test["alert_rule_test"] if case["exp_alerts"]
    }
    assert alerts <= tested  # every alert is shown firing in a unit test


def exported_names(metrics_text: str) -> set[str]:
    """Every sample name a /metrics page can carry, from its TYPE lines (a labelled family with no
    child yet prints no samples, but is exported all the same)."""
    suffixes = {
        "counter": [""],  # the TYPE line names it with its _total already
        "gauge": [""],
        "histogram": ["_bucket", "_sum", "_count", "_created"],
        "summary": ["", "_sum", "_count", "_created"],
        "untyped": [""],
        "info": ["_info"],
    }
    names = set()
    for line in metrics_text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names |= {name + suffix for suffix in suffixes[kind]}
    return names


def queried_names(expressions: list[str]) -> set[str]:
    return {name for expression in expressions for name in METRIC.findall(expression)}


def test_every_metric_the_dashboard_and_the_alerts_query_is_one_bon_exports(server):
    headers = {"Authorization": f"Bearer {API_KEYS[0]}"}
    body = {"model": "gpt2_policy", "prompt": "the cat", "max_tokens": 3, "best_of": 2}
    assert (
        httpx.post(f"{server.url}/v1/completions", json=body, headers=headers, timeout=60).status_code == 200
    )
    exported = exported_names(httpx.get(f"{server.url}/metrics", headers=headers).text)
    dashboard = json.loads((DEPLOY / "grafana/bon.json").read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    expressions += [variable["definition"] for variable in dashboard["templating"]["list"]]
    rules = yaml.safe_load((DEPLOY / "prometheus/alerts.yml").read_text())
    expressions += [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    queried = queried_names(expressions)
    assert len(queried) >= 15 and queried <= exported, sorted(queried - exported)
    # And the check itself can fail: a name bon does not export is caught.
    assert not queried_names(["rate(bon_requests_count[5m])"]) <= exported
    # The dashboard shows requests, latency, tokens, queues, reward per reward model and per policy
    # version, and reloads.
    panels = queried_names([target["expr"] for panel in dashboard["panels"] for target in panel["targets"]])
    assert {"bon_requests_total", "bon_request_duration_seconds_bucket", "bon_generation_tokens_total",
            "bon_queue_wait_seconds_bucket", "bon_member_reward_bucket", "bon_candidate_reward_bucket",
            "bon_model_reloads_total"} <= panels  # fmt: skip
    grouped = " ".join(target["expr"] for panel in dashboard["panels"] for target in panel["targets"])
    assert "by (member, version, le)" in grouped and "by (policy_version, le)" in grouped


def kubernetes_validate(*paths: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "kubernetes_validate", "--strict", *map(str, paths)]
    return subprocess.run(command, capture_output=True, text=True)


def test_the_kubernetes_manifests_are_valid_against_the_schemas(tmp_path):
    manifests = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
    kinds = {yaml.safe_load(m.read_text())["kind"] for m in manifests}
    assert {"Deployment", "Service", "CronJob", "Secret", "PersistentVolumeClaim"} <= kinds
    checked = kubernetes_validate(*manifests)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # A misspelt field is caught: the validation is strict.
    broken = tmp_path / "deployment.yaml"
    broken.write_text(
        (DEPLOY / "kubernetes/deployment.yaml").read_text().replace("readinessProbe:", "readinessProbes:")
    )
    assert kubernetes_validate(broken).returncode != 0


def test_the_deployment_probes_reads_secrets_and_asks_for_a_gpu():
    deployment = yaml.safe_load((DEPLOY / "kubernetes/deployment.yaml").read_text())
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    from_secret = {
        e["name"]: e["valueFrom"]["secretKeyRef"]["key"]
        for e in container["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert from_secret == {
        "BON_SAMPLE_LOG": "database-url",
        "BON_API_KEY": "api-key",
        "BON_ADMIN_KEY": "admin-key",
    }
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert any(m["mountPath"] == "/models" for m in container["volumeMounts"])
    cronjob = yaml.safe_load((DEPLOY / "kubernetes/cronjob.yaml").read_text())
    [job] = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert job["command"] == ["bon", "retrain"] and cronjob["spec"]["concurrencyPolicy"] == "Forbid"


def test_the_compose_file_wires_bon_postgres_prometheus_grafana_and_a_retrain_job():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"bon", "retrain", "postgres", "prometheus", "grafana"} <= set(services)
    for name, service in services.items():  # every file it mounts is in the repository
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists() or source == "./models", f"{name}: {source}"
    assert services["bon"]["environment"]["BON_SAMPLE_LOG"].startswith("postgresql://bon:")
    assert "bon retrain" in services["retrain"]["command"][0]
    prometheus = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    assert prometheus["rule_files"] == ["/etc/prometheus/alerts.yml"]
    assert any(v.endswith(":/etc/prometheus/alerts.yml:ro") for v in services["prometheus"]["volumes"])
    assert any("grafana/bon.json:" in v for v in services["grafana"]["volumes"])
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/bon.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
