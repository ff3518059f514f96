"""`recallfix compare` and lm-evaluation-harness on the real model, over two upstreams: `recallfix serve` and vLLM's
own OpenAI server.

The upstreams:

* `recallfix serve` (server_fixtures' shared `serve-lora` server): PATCH_GAINS as a LoRA adapter, served as NAME and
  NAME:patched behind an API key;
* vLLM's own API server, started here once, on the base model with two LoRA modules: RUN_PATCHED, the gains
  `recallfix analyze` learned on a subset of the shipped facts (the session's run, real_model.real_run), and LEARNED,
  PATCH_GAINS exported with `recallfix patch export --format lora` (the front's NAME:patched).

Then:

* compare on the analysis run's held-out test split gives the analysis' own numbers for base and RUN_PATCHED;
* compare of NAME vs NAME:patched through `recallfix serve` and of NAME vs LEARNED on vLLM's server give the same
  numbers, per fact and overall (on the first N_TWIN facts of that split);
* `lm_eval --model local-completions` through `recallfix serve` (NAME and NAME:patched) gives compare's numbers
  on the same facts;
* an unknown model, or a server without echo logprobs, fails with one line; model B through a second, busy server
  (retries) gives the same numbers.

Tolerances. Against the analysis: it runs Hugging Face float32 on CPU with the patch applied to the weights; vLLM
runs its own float32 CPU kernels with the patch as a LoRA delta. The two agree to about 1e-4 in log-probabilities
or better (shared/notes/vllm-facts.md; on this model's test split the means agreed to 5e-7), so means of
probabilities, top-1 probabilities and NLLs must agree to LOGPROB_TOL = 1e-4. Accuracy, AUROC and ECE bins can
only move for a fact whose top two tokens (or whose confidence and a bin edge) are closer than that, which the
tests count from the per-fact numbers rather than assume away. Brier over HTTP sums the top k and the answer only:
the rest of the vocabulary adds at most the per-fact bound compare reports.

Between the two upstreams: both are the same vLLM with the same float32 weights, the same adapter (exported by the
same code from the same patch), the same LoRA kernels and options; what differs is only which requests share a
batch (the front adds shadow scorings; the servers schedule on their own), and a CPU matrix product's blocking
may change with the batch's size, moving float32 logits by a few ulps. So per-fact log-probabilities must agree
to TWIN_TOL = 1e-5 nats (ten times what a few float32 ulps of logits of this size give), and every right/wrong,
rank and greedy generation must be equal unless the fact's deciding gap is below TWIN_TOL. (Measured: the two
gave the same log-probabilities to the last bit on all 56 facts of the test split.)

All tests here need `serve-lora` (module mark): they run as one block of server_fixtures' serve-lora group, so
this module's vLLM server is started once (the analysis run is the session's, shared with test_analysis_real.py;
RECALLFIX_TEST_REAL_RUN=RUN reuses one, see real_model.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import jsonschema
import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI, Request, Response
from server_fixtures import (
    API_KEY,
    NAME,
    SMALL_KV,
    VLLM_OPTIONS,
    Metrics,
    Process,
    free_port,
    patch_file,
    shared,
    wait_for,
)

from recallfix.analysis.compare.run import select_facts
from recallfix.analysis.compare.schema import COMPARE_SCHEMA_PATH
from recallfix.analysis.schema import AnalysisResult
from recallfix.patches.calibrator import CalibrationFile
from recallfix.patches.cli import main as recallfix_main
from recallfix.patches.export import VLLM_LORA_RANKS

pytestmark = [pytest.mark.real_model, pytest.mark.servers("serve-lora")]

ROOT = Path(__file__).resolve().parents[1]
PATCHED = f"{NAME}:patched"  # recallfix serve's patched variant (PATCH_GAINS)
RUN_PATCHED = f"{NAME}:run"  # on vLLM's server: the gains of the session's analysis run
LEARNED = f"{NAME}:learned"  # on vLLM's server: PATCH_GAINS, the adapter of recallfix serve's NAME:patched
# Facts of the two-upstream and lm-eval tests: the first of the run's test split. Each is asked of recallfix
# serve's LoRA engine, whose patched variant runs about 30x slower than its base on CPU, and whose shadow
# scoring (--shadow-rate 1.0) asks the other variant too: the whole split (56) took 7.5 min there on a busy
# 2-core machine.
N_TWIN = 24
LOGPROB_TOL = 1e-4  # |mean difference| of p and NLL between vLLM and Hugging Face float32 (see the module doc)
NEAR = 1e-4  # a fact whose deciding gap is below this may flip between the two (counted, see the module doc)
TWIN_TOL = 1e-5  # per-fact log-probabilities, recallfix serve against vLLM's server (see the module doc)


# -- the module: analysis run, LoRA adapters, vLLM's server, recallfix serve ---------------------------------


@pytest.fixture(scope="module")
def run(real_run: tuple[Path, int]) -> Path:
    """The session's analysis run of the real model (real_model.real_run, shared with test_analysis_real.py)."""
    out, code = real_run
    assert code == 0
    return out


@pytest.fixture(scope="module")
def analysis(run: Path) -> AnalysisResult:
    return AnalysisResult.model_validate_json((run / "analysis.json").read_text())


def export_lora(model_dir: Path, patch: Path, out: Path) -> Path:
    assert recallfix_main(["patch", "export", "--model", str(model_dir), "--patch", str(patch), "--format", "lora",
                           "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def adapters(real_model_dir: Path, run: Path, analysis: AnalysisResult, tmp_path_factory: pytest.TempPathFactory,
             ) -> dict[str, Path]:
    """served name on vLLM's server -> PEFT LoRA adapter."""
    assert analysis.evaluation is not None
    gains = next(m.file for m in analysis.evaluation.methods if m.name == "gains")
    out = tmp_path_factory.mktemp("compare-lora")
    return {RUN_PATCHED: export_lora(real_model_dir, run / gains, out / "run"),
            LEARNED: export_lora(real_model_dir, patch_file("learned"), out / "learned")}


def vllm_with_adapters(model_dir: Path, adapters: dict[str, Path], log: Path) -> Process:
    """vLLM's own OpenAI API server on the base model, each adapter a LoRA module, with the options recallfix
    serve's vLLM gets (server_fixtures.VLLM_OPTIONS) and LoRA only where the adapters are (faster on CPU)."""
    configs = [json.loads((a / "adapter_config.json").read_text()) for a in adapters.values()]
    rank = min(r for r in VLLM_LORA_RANKS if r >= max(c["r"] for c in configs))
    targets = sorted({m for c in configs for m in c["target_modules"]})
    return Process(["-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--served-model-name", NAME,
                    "--host", "127.0.0.1", *VLLM_OPTIONS, *SMALL_KV, "--enable-lora",
                    "--max-loras", str(len(adapters)), "--max-lora-rank", str(rank), "--lora-target-modules", *targets,
                    "--lora-modules", *(f"{name}={path}" for name, path in adapters.items())],
                   log, key=None, env={"VLLM_CPU_OMP_THREADS_BIND": "nobind"})


@pytest.fixture(scope="module")
def upstreams(real_model_dir: Path, adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """(vLLM's own server, recallfix serve): both start at once, each waited for."""
    vllm = vllm_with_adapters(real_model_dir, adapters, tmp_path_factory.mktemp("vllm") / "server.log").start()
    try:
        started = time.monotonic()
        (front,) = shared("serve-lora")
        vllm.wait("/health")
        print(f"vLLM's API server and recallfix serve ready after {time.monotonic() - started:.0f} s")
        yield vllm, front
    finally:
        vllm.stop()


@pytest.fixture(scope="module")
def vllm(upstreams: tuple[Process, Process]) -> Process:
    return upstreams[0]


@pytest.fixture(scope="module")
def front(upstreams: tuple[Process, Process]) -> Process:
    return upstreams[1]


def _compare(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "recallfix.patches.cli", "compare", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def _compared(tmp_path_factory: pytest.TempPathFactory, url: str, a: str, b: str, *args: str) -> tuple[Path, str]:
    """compare A vs B (on the facts `args` choose): (its directory, what it printed)."""
    out = tmp_path_factory.mktemp("compare") / "out"
    started = time.monotonic()
    done = _compare("--base-url", url, "--models", a, b, "--n-boot", "200", "--out", str(out), *args)
    assert done.returncode == 0, done.stderr[-3000:]
    print(f"compare {a} vs {b} at {url} took {time.monotonic() - started:.0f} s")
    return out, done.stdout


@pytest.fixture(scope="module")
def compared(vllm: Process, run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """vLLM's server: NAME vs the analysis run's patch, on the run's test split, each with its calibrator."""
    return _compared(tmp_path_factory, vllm.url, NAME, RUN_PATCHED, "--run", str(run), "--split", "test",
                     "--calibration", str(run / "calibration.json"), "--calibrators", "base,gains")


@pytest.fixture(scope="module")
def twin_facts(run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first N_TWIN facts of the run's test split, as a facts file (JSONL)."""
    facts = select_facts(None, run, "test").facts[:N_TWIN]
    path = tmp_path_factory.mktemp("twin") / "facts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f.prompt, "answer": f.answer, "subject": f.subject,
                                        "relation": f.relation}) + "\n" for f in facts))
    return path


@pytest.fixture(scope="module")
def compared_serve(front: Process, twin_facts: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """recallfix serve: NAME vs NAME:patched (PATCH_GAINS)."""
    return _compared(tmp_path_factory, front.url, NAME, PATCHED, "--facts", str(twin_facts), "--api-key", API_KEY)


@pytest.fixture(scope="module")
def compared_vllm(vllm: Process, twin_facts: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """vLLM's server: NAME vs LEARNED (PATCH_GAINS)."""
    return _compared(tmp_path_factory, vllm.url, NAME, LEARNED, "--facts", str(twin_facts))


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def _per_fact(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "per_fact.jsonl").read_text().splitlines()]


# -- compare gives the analysis' numbers ------------------------------------------------------------------------


def test_compare_writes_its_files_and_prints_a_table(compared: tuple[Path, str]) -> None:
    out, printed = compared
    results = _results(out)
    jsonschema.validate(results, json.loads(COMPARE_SCHEMA_PATH.read_text()))
    assert len(_per_fact(out)) == results["facts"]["n_facts"]
    assert (out / "reliability.png").stat().st_size > 10_000 and (out / "risk_coverage.png").stat().st_size > 10_000
    report = (out / "report.md").read_text()
    assert "## Confidence: calibration and abstention" in report and "B: calibrated - raw" in report
    assert f"{NAME} (A) vs {RUN_PATCHED} (B)" in report and "McNemar" in report and "## Per relation" in report
    assert NAME in printed and RUN_PATCHED in printed and "B - A" in printed and "McNemar" in printed
    bins = results["reliability"]
    assert sum(b["count"] for b in bins["A"]) == sum(b["count"] for b in bins["B"]) == results["facts"]["n_compared"]


def _near_flips(per_fact: list[dict], key: str) -> tuple[int, int]:
    """Facts whose right/wrong could flip between the servers (the answer's first token within NEAR nats of the
    best other token), and facts whose confidence is within NEAR (relative) of an equal-width bin edge."""
    placed = [f[key] for f in per_fact if f[key]["unplaced"] is None]
    flips = sum(abs(s["margin"]) < NEAR for s in placed)
    edges = sum(abs(s["confidence"] - round(s["confidence"] * 15) / 15) < NEAR * s["confidence"] for s in placed)
    return flips, edges


def test_compare_agrees_with_the_analysis_on_its_test_split(compared: tuple[Path, str],
                                                            analysis: AnalysisResult) -> None:
    out, _ = compared
    results, per_fact = _results(out), _per_fact(out)
    assert analysis.evaluation is not None
    test = analysis.evaluation.test
    assert results["facts"]["split"] == "test"
    assert results["facts"]["n_facts"] == test.n
    assert results["facts"]["n_unplaced"] == {"A": 0, "B": 0}  # SmolLM2's tokenizer places every shipped answer
    assert results["overall"]["n"] == test.n and results["overall"]["n_groups"] == test.n_groups
    report = []
    for key, model in (("A", "base"), ("B", "gains")):
        ours, theirs = results["overall"]["models"][key], test.models[model]
        flips, edges = _near_flips(per_fact, key)
        n = test.n
        tail = sum(f[key]["brier_tail_max"] for f in per_fact) / n
        for metric, tol in (("mean_p_answer", LOGPROB_TOL), ("mean_confidence", LOGPROB_TOL), ("nll", LOGPROB_TOL),
                            ("accuracy", flips / n), ("ece_equal_width", LOGPROB_TOL + 2 * edges / n),
                            ("ece_equal_mass", 2 * LOGPROB_TOL), ("auroc", LOGPROB_TOL + flips / n)):
            a, b = ours[metric]["value"], theirs[metric].value
            report.append(f"{model} {metric}: compare {a:.6f} analyze {b:.6f} diff {a - b:+.2e} (tol {tol:.1e})")
            assert abs(a - b) <= tol + 1e-12, report[-1]
        # Brier over HTTP sums the top k and the answer; the rest of the vocabulary adds at most `tail`.
        a, b = ours["brier"]["value"], theirs["brier"].value
        report.append(f"{model} brier: compare {a:.6f} analyze {b:.6f} diff {a - b:+.2e} (tail <= {tail:.1e})")
        assert -LOGPROB_TOL - tail <= a - b <= LOGPROB_TOL, report[-1]
        for relation, evaluation in analysis.evaluation.by_relation.items():
            mine = results["by_relation"][relation]["models"][key]
            assert mine["accuracy"]["value"] == pytest.approx(evaluation.models[model]["accuracy"].value,
                                                              abs=flips / evaluation.n + 1e-12)
            assert mine["mean_p_answer"]["value"] == pytest.approx(evaluation.models[model]["mean_p_answer"].value,
                                                                   abs=LOGPROB_TOL)
    print("\n".join(report))


def test_compare_measures_each_models_calibrator_as_the_analysis_did(compared: tuple[Path, str],
                                                                     analysis: AnalysisResult, run: Path) -> None:
    """The calibrators of the run's calibration.json applied to the served top-k give the analysis' numbers."""
    out, _ = compared
    results, per_fact = _results(out), _per_fact(out)
    assert analysis.evaluation is not None and analysis.evaluation.calibration is not None
    confidence, file = results["confidence"], CalibrationFile.load(run / "calibration.json")
    n = results["overall"]["n"]
    report = []
    for key, model in (("A", "base"), ("B", "gains")):
        variant = analysis.evaluation.calibration.variants[model]
        assert confidence["calibrators"][key] == f"{model} ({variant.calibrator_id})"
        flips, edges = _near_flips(per_fact, key)
        calibrated = file.variants[model].calibrator.predict(np.asarray([f[key]["top_logprobs"] for f in per_fact]))
        calibrated_edges = int((np.abs(calibrated * 15 - np.round(calibrated * 15)) < 15 * 1e-3).sum())
        for kind, theirs, near in (("raw", variant.raw, edges), ("calibrated", variant.calibrated, calibrated_edges)):
            ours = confidence[kind]["models"][key]
            for metric, tol in (("log_loss", 1e-3), ("brier", 1e-3), ("ece", 2e-3 + 2 * near / n),
                                ("aurc", 5e-3 + flips / n), ("selective_accuracy_80", 5e-3 + flips / n)):
                a, b = ours[metric]["value"], theirs[metric].value
                report.append(f"{model} {kind} {metric}: compare {a:.5f} analyze {b:.5f} (tol {tol:.1e})")
                assert abs(a - b) <= tol, report[-1]
    print("\n".join(report))


# -- the same numbers from recallfix serve and from vLLM's own server ---------------------------------------------


def _same_fact(serve: dict, vllm: dict, where: str) -> list[str]:
    """One model's numbers on one fact from the two upstreams: equal, or within TWIN_TOL; a discrete number may
    differ only where its deciding gap is below TWIN_TOL (returned as the near ties that moved)."""
    assert serve["unplaced"] == vllm["unplaced"] and serve["answer_tokens"] == vllm["answer_tokens"], where
    if serve["unplaced"] is not None:
        return []
    for number in ("answer_logprob", "p_answer", "confidence", "margin", "brier"):
        assert serve[number] == pytest.approx(vllm[number], abs=TWIN_TOL), f"{where}: {number}"
    moved = [f"{where}: {number}" for number in ("correct", "rank", "rank_above", "prediction", "answer_greedy",
                                                 "generation", "exact_match") if serve[number] != vllm[number]]
    assert not moved or abs(serve["margin"]) < TWIN_TOL, moved
    return moved


def test_compare_over_recallfix_serve_and_over_vllm_gives_the_same_numbers(
        compared_serve: tuple[Path, str], compared_vllm: tuple[Path, str]) -> None:
    """NAME vs NAME:patched through recallfix serve (PATCH_GAINS as its LoRA adapter) and NAME vs LEARNED on
    vLLM's own server (the same patch exported as a LoRA module): the same per-fact and overall numbers."""
    serve, vllm = _results(compared_serve[0]), _results(compared_vllm[0])
    assert serve["models"]["A"]["model"] == vllm["models"]["A"]["model"] == NAME
    assert (serve["models"]["B"]["model"], vllm["models"]["B"]["model"]) == (PATCHED, LEARNED)
    assert serve["facts"] == vllm["facts"]
    per_serve, per_vllm = _per_fact(compared_serve[0]), _per_fact(compared_vllm[0])
    assert len(per_serve) == len(per_vllm) == serve["facts"]["n_facts"] > 0
    moved, worst = [], 0.0
    for i, (a, b) in enumerate(zip(per_serve, per_vllm, strict=True)):
        assert (a["prompt"], a["answer"]) == (b["prompt"], b["answer"])
        for key in ("A", "B"):
            moved += _same_fact(a[key], b[key], f"fact {i} {key}")
            if a[key]["unplaced"] is None:
                worst = max(worst, abs(a[key]["answer_logprob"] - b[key]["answer_logprob"]))
    print(f"{len(per_serve)} facts; largest per-fact log-likelihood difference {worst:.2e}; near ties moved: {moved}")
    # The patch does something here: B differs from A (else the test would not tell the variants apart).
    assert any(abs(f["B"]["answer_logprob"] - f["A"]["answer_logprob"]) > 100 * TWIN_TOL for f in per_serve)
    # Overall: the same facts and subjects, so the same bootstrap resamples; each estimate and interval end moves
    # by at most the per-fact tolerance, plus a fact's share for each near tie of a right/wrong metric.
    discrete = ("accuracy", "auroc", "ece_equal_width", "ece_equal_mass", "exact_match", "answer_greedy")
    n = serve["overall"]["n"]
    allowed = len(moved) / n
    for what, ours, theirs in [*((key, serve["overall"]["models"][key], vllm["overall"]["models"][key])
                                 for key in ("A", "B")),
                               ("B - A", serve["overall"]["difference"], vllm["overall"]["difference"])]:
        assert ours.keys() == theirs.keys()
        for metric in ours:
            tol = 2 * TWIN_TOL + (allowed if metric in discrete else 0)
            for end in ("value", "ci_low", "ci_high"):
                x, y = ours[metric][end], theirs[metric][end]
                assert (x is None) == (y is None) and (x is None or abs(x - y) <= tol), f"{what} {metric} {end}"
    if not moved:
        assert serve["overall"]["mcnemar"] == vllm["overall"]["mcnemar"]


def test_echo_requests_through_the_front_leave_its_token_metrics_alone(front: Process) -> None:
    """compare scores by echo: those logprobs are the prompt's, which must not count as generated tokens (nor be
    shadow-scored, which would compare a prompt token with a generated one)."""
    before = front.metrics()
    echo = front.post("/v1/completions", {"model": NAME, "prompt": "The capital of France is Paris", "echo": True,
                                          "logprobs": 5, "max_tokens": 0})
    assert echo.status_code == 200 and echo.json()["choices"][0]["logprobs"]["tokens"]
    after_echo = front.metrics()
    generated = front.post("/v1/completions", {"model": NAME, "prompt": "The capital of France is", "max_tokens": 2,
                                               "temperature": 0.0})
    assert generated.status_code == 200
    shadowed = wait_for(lambda: front.metrics().delta(before, "recallfix_shadow_top1_confidence_count", model=NAME,
                                                      variant="base", scored="patched") >= 1)
    assert shadowed, "the generating request was not shadow-scored (serve-lora's --shadow-rate is 1.0)"
    after = front.metrics()
    for name in ("recallfix_token_confidence_count", "recallfix_first_token_confidence_count"):
        assert after_echo.delta(before, name, model=NAME, variant="base") == 0, name
    assert after_echo.delta(before, "recallfix_requests_total", model=NAME, variant="base",
                            endpoint="/v1/completions") == 1
    assert after.delta(after_echo, "recallfix_token_confidence_count", model=NAME, variant="base") == 2
    assert after.delta(before, "recallfix_shadow_top1_confidence_count", model=NAME, variant="base",
                       scored="patched") == 1


# -- trouble ----------------------------------------------------------------------------------------------------


def _one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr[-3000:]
    return lines[0]


def requests_done(server: Process) -> float:
    """The requests vLLM has finished (its own counter; the front passes vLLM's series on), once the front has no
    shadow scoring of earlier requests pending (it would ask vLLM of its own meanwhile)."""
    def scrape() -> Metrics:
        return Metrics.parse(httpx.get(server.url + "/metrics", headers=server.headers(), timeout=60).text)

    settled = wait_for(lambda: (m := scrape()).value("recallfix_shadow_pending") == 0 and m, timeout=300)
    assert settled, "shadow scorings still pending after 300 s"
    return settled.value("vllm:request_success_total")


@pytest.mark.parametrize("upstream", ["vllm", "front"])
def test_an_unknown_model_fails_fast_with_one_line(upstreams: tuple[Process, Process], upstream: str, run: Path,
                                                   tmp_path: Path) -> None:
    server = upstreams[0] if upstream == "vllm" else upstreams[1]
    key = ["--api-key", API_KEY] if upstream == "front" else []
    asked = server.post("/v1/completions", {"model": NAME, "prompt": "Hi", "max_tokens": 1})
    assert asked.status_code == 200, asked.text
    before = requests_done(server)
    assert before >= 1, "no count of vLLM's finished requests"
    line = _one_line_error(_compare("--base-url", server.url, "--models", NAME, "no-such-model", "--run", str(run),
                                    "--split", "test", "--out", str(tmp_path / "out"), *key, timeout=300))
    # It stopped at its check, before asking the split's facts: both models are checked at once, and the known one's
    # check may have asked its probe fact before the other's model list came back.
    assert requests_done(server) - before <= 1
    assert "no-such-model" in line and "unknown model" in line and NAME in line
    assert not (tmp_path / "out").exists()


class Proxy:
    """A second server in front of vLLM (real HTTP, uvicorn in a thread) that forwards every request, after
    answering its first `busy` requests 503 and 429 (Retry-After: 0) by turns; with `no_logprobs` it drops the
    log-probabilities from the completions it returns, like a server without echo logprobs."""

    def __init__(self, upstream: str, busy: int = 0, no_logprobs: bool = False) -> None:
        self.refused = 0
        app = FastAPI()

        @app.api_route("/{path:path}", methods=["GET", "POST"])
        async def forward(request: Request, path: str) -> Response:
            if self.refused < busy:
                self.refused += 1
                if self.refused % 2:
                    return Response(status_code=503)
                return Response(status_code=429, headers={"Retry-After": "0"})
            async with httpx.AsyncClient(timeout=600) as client:
                answer = await client.request(request.method, f"{upstream}/{path}", content=await request.body(),
                                              headers={"content-type": "application/json"})
            body = answer.content
            if no_logprobs and path.endswith("completions") and answer.status_code == 200:
                doc = answer.json()
                for choice in doc["choices"]:
                    choice["logprobs"] = None
                body = json.dumps(doc).encode()
            return Response(body, status_code=answer.status_code, media_type="application/json")

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Proxy:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def test_a_server_without_echo_logprobs_fails_with_one_line(vllm: Process, run: Path, tmp_path: Path) -> None:
    with Proxy(vllm.url, no_logprobs=True) as proxy:
        line = _one_line_error(_compare("--base-url", proxy.url, "--models", NAME, RUN_PATCHED, "--run", str(run),
                                        "--split", "test", "--out", str(tmp_path / "out"), timeout=300))
    assert proxy.url in line and "no echo logprobs" in line
    assert not (tmp_path / "out").exists()


def test_model_b_through_a_busy_second_server_gives_the_same_numbers(vllm: Process, compared: tuple[Path, str],
                                                                     tmp_path: Path) -> None:
    first = _per_fact(compared[0])[:6]
    facts = tmp_path / "facts.jsonl"
    facts.write_text("".join(json.dumps({k: f[k] for k in ("prompt", "answer", "subject", "relation")}) + "\n"
                             for f in first))
    with Proxy(vllm.url, busy=4) as proxy:
        done = _compare("--base-url", vllm.url, "--base-url-b", proxy.url, "--models", NAME,
                        RUN_PATCHED, "--facts", str(facts), "--n-boot", "50", "--concurrency", "2",
                        "--out", str(tmp_path / "out"), timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = _results(tmp_path / "out")
    assert results["models"]["B"]["base_url"] == f"{proxy.url}/v1"
    assert results["models"]["B"]["retries"] == 4 and results["models"]["A"]["retries"] == 0
    for again, before in zip(_per_fact(tmp_path / "out"), first, strict=True):
        for key in ("A", "B"):
            assert again[key]["answer_tokens"] == before[key]["answer_tokens"]
            assert again[key]["answer_logprob"] == pytest.approx(before[key]["answer_logprob"], abs=LOGPROB_TOL)
            assert again[key]["generation"] == before[key]["generation"]


# -- lm-evaluation-harness --------------------------------------------------------------------------------------


def lm_eval_command(url: str, model: str, model_dir: Path, facts: Path, out: Path) -> list[str]:
    """The harness as an outside client of the served model, on compare's facts (the README shows this). Its
    local-completions model sends `Authorization: Bearer $OPENAI_API_KEY`."""
    return [str(Path(sys.executable).with_name("lm_eval")), "--model", "local-completions",
            "--model_args", f"model={model},base_url={url}/v1/completions,tokenizer_backend=huggingface,"
                            f"tokenizer={model_dir},num_concurrent=4,max_retries=3,timeout=600",
            "--include_path", str(ROOT / "evals" / "lm_eval"), "--tasks", "recallfix_facts",
            "--metadata", json.dumps({"facts": str(facts)}),
            "--output_path", str(out), "--log_samples"]


def _samples(out: Path) -> list[dict]:
    files = sorted(out.rglob("samples_recallfix_facts_*.jsonl"))
    assert files, f"no samples file under {out}"
    return [json.loads(line) for line in files[-1].read_text().splitlines()]


@pytest.mark.parametrize(("key", "model"), [("A", NAME), ("B", PATCHED)])
def test_lm_eval_harness_through_recallfix_serve_agrees_with_compare(
        front: Process, compared_serve: tuple[Path, str], real_model_dir: Path, twin_facts: Path, tmp_path: Path,
        key: str, model: str) -> None:
    out, _ = compared_serve
    started = time.monotonic()
    done = subprocess.run(lm_eval_command(front.url, model, real_model_dir, twin_facts, tmp_path / "lm_eval"),
                          capture_output=True, text=True, timeout=1800, cwd=ROOT,
                          env={**os.environ, "OPENAI_API_KEY": API_KEY})
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    print(f"lm_eval {model} took {time.monotonic() - started:.0f} s")
    per_fact = {(f["prompt"], f["answer"]): f[key] for f in _per_fact(out)}
    samples = _samples(tmp_path / "lm_eval")
    assert len(samples) == len(per_fact)
    greedy = []
    for s in samples:
        mine = per_fact[(s["doc"]["prompt"], s["doc"]["answer"])]
        loglikelihood = float(s["filtered_resps"][0][0])  # the samples file holds [log-likelihood, is_greedy] as text
        assert loglikelihood == pytest.approx(mine["answer_logprob"], abs=LOGPROB_TOL), s["doc"]
        greedy.append((s["acc"] == 1, mine["answer_greedy"]))
    harness = json.loads(next((tmp_path / "lm_eval").rglob("results_*.json")).read_text())
    acc = harness["results"]["recallfix_facts"]["acc,none"]
    ours = _results(out)["overall"]["models"][key]["answer_greedy"]["value"]
    print(f"lm-eval acc {acc:.4f}, compare answer_greedy {ours:.4f} ({model})")
    assert sum(a != b for a, b in greedy) == 0, greedy
    assert acc == pytest.approx(ours, abs=1e-12)
