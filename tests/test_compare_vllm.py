"""`recallfix compare` and lm-evaluation-harness against vLLM's own OpenAI server on the real model.

One session: `recallfix analyze` on SmolLM2-135M (a subset of the shipped facts) learns a patch; the patch is
exported as a PEFT LoRA adapter and vLLM's API server (started here, once) serves the base model as NAME and the
adapter as NAME:patched, the names `recallfix serve` gives them. Then:

* compare on the run's held-out test split gives the analysis' own numbers for base and patched;
* an unknown model, or a server without echo logprobs, fails with one line; model B through a second, busy server
  (retries) gives the same numbers;
* `lm_eval --model local-completions` on the same facts gives the same accuracy and log-likelihoods.

Tolerances: the analysis runs Hugging Face float32 on CPU with the patch applied to the weights; vLLM runs its own
float32 CPU kernels with the patch as a LoRA delta. The two agree to about 1e-4 in log-probabilities or better
(shared/notes/vllm-facts.md; on this model's test split the means agreed to 5e-7), so means of probabilities, top-1
probabilities and NLLs must agree to 1e-4. Accuracy, AUROC and ECE bins can only move for a fact whose top two
tokens (or whose confidence and a bin edge) are closer than that, which the tests count from the per-fact numbers
rather than assume away. Brier over HTTP sums the top k and the answer only: the rest of the vocabulary adds at
most the per-fact bound compare reports.

RECALLFIX_TEST_COMPARE_RUN=RUN reuses an analysis run made with the same model (to iterate without the
analysis' minutes).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import jsonschema
import pytest
import uvicorn
from fastapi import FastAPI, Request, Response
from server_fixtures import _die_with_parent, free_port

from recallfix.analysis.compare_schema import COMPARE_SCHEMA_PATH
from recallfix.analysis.schema import AnalysisResult
from recallfix.patches.cli import main as recallfix_main
from recallfix.patches.export import VLLM_LORA_RANKS

pytestmark = [pytest.mark.real_model, pytest.mark.timeout(3600)]

ROOT = Path(__file__).resolve().parents[1]
NAME = "smollm2-135m"
PATCHED = f"{NAME}:patched"
MAX_FACTS = 300
START_TIMEOUT_S = 900  # vLLM with LoRA on a shared 2-core machine: 1-4 minutes
LOGPROB_TOL = 1e-4  # |mean difference| of p and NLL between vLLM and Hugging Face float32 (see the module doc)
NEAR = 1e-4  # a fact whose deciding gap is below this may flip between the two (counted, see the module doc)


# -- the session: analysis run, LoRA adapter, vLLM server -------------------------------------------------------


@pytest.fixture(scope="module")
def run(real_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.environ.get("RECALLFIX_TEST_COMPARE_RUN"):
        return Path(os.environ["RECALLFIX_TEST_COMPARE_RUN"])
    out = tmp_path_factory.mktemp("compare-analysis") / "run"
    code = recallfix_main(["analyze", "--model", str(real_model_dir), "--out", str(out), "--max-facts", str(MAX_FACTS),
                           "--n-boot", "200", "--method", "gains", "--no-progress"])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def analysis(run: Path) -> AnalysisResult:
    return AnalysisResult.model_validate_json((run / "analysis.json").read_text())


@pytest.fixture(scope="module")
def adapter(real_model_dir: Path, run: Path, analysis: AnalysisResult, tmp_path_factory: pytest.TempPathFactory,
            ) -> Path:
    assert analysis.evaluation is not None
    gains = next(m.file for m in analysis.evaluation.methods if m.name == "gains")
    out = tmp_path_factory.mktemp("compare-lora") / "lora"
    assert recallfix_main(["patch", "export", "--model", str(real_model_dir), "--patch", str(run / gains),
                           "--format", "lora", "--out", str(out)]) == 0
    return out


class VllmServer:
    """vLLM's own OpenAI API server (`python -m vllm.entrypoints.openai.api_server`) as a subprocess."""

    def __init__(self, model_dir: Path, adapter: Path, log: Path) -> None:
        config = json.loads((adapter / "adapter_config.json").read_text())
        self.port, self.log = free_port(), log
        self.args = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--served-model-name", NAME, "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32",
            "--enforce-eager", "--max-model-len", "256", "--max-logprobs", "20", "--seed", "0",
            "--enable-lora", "--max-loras", "1", "--lora-modules", f"{PATCHED}={adapter}",
            "--max-lora-rank", str(min(r for r in VLLM_LORA_RANKS if r >= config["r"])),
            "--lora-target-modules", *config["target_modules"],  # LoRA only where the patch is: faster on CPU
        ]
        self.proc: subprocess.Popen | None = None
        self.start_s = math.nan

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> VllmServer:
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
        started = time.monotonic()
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                         start_new_session=True, preexec_fn=_die_with_parent)
        while time.monotonic() - started < START_TIMEOUT_S:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.proc.returncode}:\n{self.log.read_text()[-5000:]}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=2).status_code == 200:
                    self.start_s = time.monotonic() - started
                    print(f"vLLM API server ready after {self.start_s:.0f} s")
                    return self
            except httpx.TransportError:
                pass
            time.sleep(1)
        self.stop()
        raise TimeoutError(f"vLLM not ready after {START_TIMEOUT_S} s:\n{self.log.read_text()[-5000:]}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def vllm(real_model_dir: Path, adapter: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    server = VllmServer(real_model_dir, adapter, tmp_path_factory.mktemp("vllm") / "server.log")
    try:
        yield server.start()
    finally:
        server.stop()


def _compare(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "recallfix.patches.cli", "compare", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def compared(vllm: VllmServer, run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """compare NAME vs NAME:patched on the run's test split: (its directory, what it printed)."""
    out = tmp_path_factory.mktemp("compare") / "out"
    started = time.monotonic()
    done = _compare("--base-url", vllm.url, "--models", NAME, PATCHED, "--run", str(run), "--split", "test",
                    "--n-boot", "200", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    print(f"compare took {time.monotonic() - started:.0f} s")
    return out, done.stdout


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
    assert (out / "reliability.png").stat().st_size > 10_000
    report = (out / "report.md").read_text()
    assert f"{NAME} (A) vs {PATCHED} (B)" in report and "McNemar" in report and "## Per relation" in report
    assert NAME in printed and PATCHED in printed and "B - A" in printed and "McNemar" in printed
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


# -- trouble ----------------------------------------------------------------------------------------------------


def _one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr[-3000:]
    return lines[0]


def test_an_unknown_model_fails_fast_with_one_line(vllm: VllmServer, run: Path, tmp_path: Path) -> None:
    line = _one_line_error(_compare("--base-url", vllm.url, "--models", NAME, "no-such-model", "--run", str(run),
                                    "--split", "test", "--out", str(tmp_path / "out"), timeout=300))
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


def test_a_server_without_echo_logprobs_fails_with_one_line(vllm: VllmServer, run: Path, tmp_path: Path) -> None:
    with Proxy(vllm.url, no_logprobs=True) as proxy:
        line = _one_line_error(_compare("--base-url", proxy.url, "--models", NAME, PATCHED, "--run", str(run),
                                        "--split", "test", "--out", str(tmp_path / "out"), timeout=300))
    assert proxy.url in line and "no echo logprobs" in line
    assert not (tmp_path / "out").exists()


def test_model_b_through_a_busy_second_server_gives_the_same_numbers(vllm: VllmServer, compared: tuple[Path, str],
                                                                     tmp_path: Path) -> None:
    first = _per_fact(compared[0])[:6]
    facts = tmp_path / "facts.jsonl"
    facts.write_text("".join(json.dumps({k: f[k] for k in ("prompt", "answer", "subject", "relation")}) + "\n"
                             for f in first))
    with Proxy(vllm.url, busy=4) as proxy:
        done = _compare("--base-url", vllm.url, "--base-url-b", proxy.url, "--models", NAME,
                        PATCHED, "--facts", str(facts), "--n-boot", "50", "--concurrency", "2",
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


def lm_eval_command(url: str, model: str, model_dir: Path, run: Path, out: Path) -> list[str]:
    """The harness as an outside client of the served model, on compare's facts (the README shows this)."""
    return [str(Path(sys.executable).with_name("lm_eval")), "--model", "local-completions",
            "--model_args", f"model={model},base_url={url}/v1/completions,tokenizer_backend=huggingface,"
                            f"tokenizer={model_dir},num_concurrent=4,max_retries=3,timeout=600",
            "--include_path", str(ROOT / "evals" / "lm_eval"), "--tasks", "recallfix_facts",
            "--metadata", json.dumps({"run": str(run), "split": "test"}),
            "--output_path", str(out), "--log_samples"]


def _samples(out: Path) -> list[dict]:
    files = sorted(out.rglob("samples_recallfix_facts_*.jsonl"))
    assert files, f"no samples file under {out}"
    return [json.loads(line) for line in files[-1].read_text().splitlines()]


@pytest.mark.parametrize(("key", "model"), [("A", NAME), ("B", PATCHED)])
def test_lm_eval_harness_agrees_with_compare(vllm: VllmServer, compared: tuple[Path, str], real_model_dir: Path,
                                             run: Path, tmp_path: Path, key: str, model: str) -> None:
    out, _ = compared
    started = time.monotonic()
    done = subprocess.run(lm_eval_command(vllm.url, model, real_model_dir, run, tmp_path / "lm_eval"),
                          capture_output=True, text=True, timeout=1800, cwd=ROOT)
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
