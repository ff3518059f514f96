"""deploy/: the Prometheus config and rules pass promtool (and the rules' own unit tests), the dashboard
and the alerts only use series the server exports or the rules record, and the Kubernetes manifest
and Dockerfiles start the server with options it accepts."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from recallfix.server.cli import add_arguments, config_from_args
from recallfix.server.metrics import Metrics

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
SERIES = re.compile(r"\brecallfix[:_][a-zA-Z0-9_:]*")


def promtool(*args: str) -> None:
    tool = shutil.which("promtool")
    assert tool, "promtool is missing: apt-get install prometheus"
    done = subprocess.run([tool, *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_prometheus_config_and_rules_pass_promtool() -> None:
    promtool("check", "config", "prometheus.yml")
    promtool("check", "rules", "recallfix.rules.yml")


def test_rules_do_what_they_say() -> None:
    """Recording rules (reliability bins, mean shift) and alerts on synthetic series."""
    promtool("test", "rules", "recallfix.rules.test.yml")


def exported_series() -> set[str]:
    """Every sample name the server's registry can expose (histograms: _bucket, _count, _sum)."""
    names = set()
    for family in Metrics("m").registry.collect():
        names.add(family.name)
        if family.type == "counter":
            names.add(family.name + "_total")
        if family.type == "histogram":
            names |= {family.name + suffix for suffix in ("_bucket", "_count", "_sum")}
    return names


def recorded_series() -> set[str]:
    rules = yaml.safe_load((PROMETHEUS / "recallfix.rules.yml").read_text())
    return {rule["record"] for group in rules["groups"] for rule in group["rules"] if "record" in rule}


def test_rules_and_dashboard_use_only_real_series() -> None:
    known = exported_series() | recorded_series()
    rules_text = (PROMETHEUS / "recallfix.rules.yml").read_text()
    dashboard = json.loads((DEPLOY / "grafana" / "recallfix-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert exprs
    for name in set(SERIES.findall(rules_text + "\n".join(exprs))):
        assert name in known, f"{name} is neither exported by the server nor recorded by the rules"
    # The dashboard shows the calibration shift and the reliability diagram.
    assert any("confidence_shift" in e for e in exprs) and any("feedback_answers" in e for e in exprs)
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


def serve_args(args: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(args)


def test_kubernetes_manifest_runs_the_server_with_valid_options() -> None:
    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "recallfix.yaml").read_text()))
    by_kind = {doc["kind"]: doc for doc in docs}
    assert set(by_kind) == {"Deployment", "Service"}
    pod = by_kind["Deployment"]["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    config = config_from_args(serve_args(container["args"]))
    assert config.host == "0.0.0.0" and config.port == container["ports"][0]["containerPort"]
    env = {e["name"]: e for e in container["env"]}
    assert "secretKeyRef" in env["RECALLFIX_API_KEY"]["valueFrom"]  # the key never sits in the manifest
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(config.port)
    service = by_kind["Service"]["spec"]
    assert service["ports"][0]["targetPort"] == container["ports"][0]["name"]
    assert service["selector"].items() <= pod["metadata"]["labels"].items()


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_dockerfiles_start_the_server_with_valid_options(name: str) -> None:
    text = (DEPLOY / "docker" / name).read_text()
    instructions = re.sub(r"\\\n\s*", " ", text)  # join continued lines
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", instructions, re.M).group(1))
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", instructions, re.M).group(1))
    assert entrypoint == ["recallfix", "serve"]
    config = config_from_args(serve_args(cmd))
    assert config.host == "0.0.0.0" and f"EXPOSE {config.port}" in text
    assert re.search(r"^USER (?!root)\S+$", text, re.M)  # not root
    assert "HEALTHCHECK" in text and "/health" in text
    assert (DEPLOY / "docker" / f"{name}.dockerignore").exists()
