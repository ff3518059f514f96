"""`recallfix compare`: two models A/B-compared over HTTP on a facts set, through any OpenAI-compatible server.

    recallfix compare --base-url URL --models A B [--facts FILE|DIR] [--base-url-b URL] [--api-key K]
                      [--split test --run RUN] --out DIR

Each fact is asked of both models (`client`: echo logprobs of the answer, greedy generation). The
per-fact numbers become the analysis' per-prompt record (`records.Dist`), so every statistic is the analysis'
own (`calibration`): the same definitions as `recallfix analyze`'s evaluation, which makes the two agree on the
same facts and model (up to the servers' floating point):

    confidence   top-1 probability of the next-token distribution after the prompt
    correct      the answer's first token is its top-1 (accuracy = mean correct)
    p(answer)    probability of the answer's first token; NLL = mean -log p(answer)

ECE (equal-width and equal-mass, 15 bins), Brier and AUROC read confidence against correct. Besides those:
exact_match (greedy generation, normalised), answer_greedy (every answer token top-1 given the ones before it)
and answer_logprob (log-likelihood of the whole answer). Per model and per relation with 95% bootstrap
intervals (subjects resampled, the same resamples for both models), B - A paired, and McNemar's exact test on
accuracy and exact match.

Facts: a named set (`shipped`, the default, or `lre`: `data.sets`) or a facts file or folder (`facts.read_facts`),
`--relations` and `--templates` choosing among them as analyze's do; with `--run RUN` the facts that analysis run
used (its facts, relations, templates, split, seed and size, checked against its sha256), and with `--split` one
of its splits.
With `--calibration RUN/calibration.json`, each model's confidence is also measured after its calibrator
(`confidence`): ECE, selective accuracy at fixed coverage and the risk-coverage area, B - A and calibrated - raw.
Writes DIR/{report.md, results.json (`schema`), per_fact.jsonl, reliability.png} and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from recallfix.patches import __version__
from recallfix.patches.calibrator import CALIBRATION_TOP_K, VariantCalibration
from recallfix.patches.io import atomic_directory, atomic_write_text
from recallfix.patches.options import add_options, from_args

from .. import calibration as cal
from ..config import CompareConfig
from ..data.facts import SPLITS, Fact, dataset_sha256, load_facts
from ..data.inputs import select_known, subject_group, subsample
from ..data.sets import DEFAULT_FACTS, FACTS_HELP, resolve_facts
from ..records import Dist
from ..schema import AnalysisResult
from .client import CompareError, Endpoint, FactScore
from .confidence import confidence_comparison, resolve_calibrators
from .schema import COMPARE_SCHEMA_VERSION, CompareResult, Comparison, FactsInfo, McNemar, ModelEndpoint, Unplaced

MODELS = ("A", "B")
METRICS: dict[str, cal.Metric] = {
    **cal.METRICS,
    "exact_match": cal.mean_of("exact_match"),
    "answer_greedy": cal.mean_of("answer_greedy"),
    "answer_logprob": cal.mean_of("answer_logprob"),
}
MCNEMAR_COLUMNS = {"accuracy": "correct", "exact_match": "exact_match"}
DEFINITIONS = {
    "accuracy": "share of facts whose answer's first token is the top-1 next token after the prompt",
    "mean_p_answer": "mean probability of the answer's first token after the prompt",
    "mean_confidence": "mean top-1 probability after the prompt (the confidence of every calibration metric)",
    "ece_equal_width": "expected calibration error of confidence against accuracy, 15 equal-width bins",
    "ece_equal_mass": "expected calibration error of confidence against accuracy, 15 equal-mass bins",
    "brier": "multi-class Brier score of the next-token distribution over the top-k tokens and the answer's; the "
             "rest of the vocabulary adds at most per_fact brier_tail_max",
    "nll": "mean -log p(answer's first token), nats",
    "auroc": "AUROC of confidence separating correct from wrong facts",
    "exact_match": "the greedy generation starts with the answer, word for word, ignoring case, punctuation, "
                   "whitespace and a leading article",
    "answer_greedy": "every answer token is the top-1 given the prompt and the answer tokens before it "
                     "(lm-evaluation-harness's loglikelihood acc)",
    "answer_logprob": "mean log-likelihood of the whole answer (all its tokens), nats",
}


# -- which facts --------------------------------------------------------------------------------------


@dataclass
class Selection:
    facts: list[Fact]
    path: str
    run: Path | None
    split: str | None


def run_facts(run: Path, facts: str | Path | None, relations: Sequence[str] | None = None,
              templates: str | None = None) -> tuple[list[Fact], str]:
    """The facts an analysis run used, in its order and with its splits: its facts (or `facts`, e.g. the same file
    moved) read, selected, split and cut to its size as `inputs.select_known` did for the run, checked against the
    sha256 it recorded. `relations` and `templates`, when given, must be the run's."""
    try:
        data = AnalysisResult.model_validate_json((run / "analysis.json").read_text(encoding="utf-8")).data
    except OSError as err:
        raise CompareError(f"{run}: not an analysis run ({err.strerror}: analysis.json)") from None
    except ValueError as err:
        raise CompareError(f"{run / 'analysis.json'}: not a recallfix analysis ({str(err).splitlines()[0]})") from None
    for option, given, used in (("--relations", sorted(relations) if relations else None,
                                 sorted(data.selected_relations) if data.selected_relations else None),
                                ("--templates", templates, data.templates)):
        if given is not None and given != used:
            shown = [",".join(v) if isinstance(v, list) else v or "(all)" for v in (used, given)]
            raise CompareError(f"{run}: analysed with {option} {shown[0]}, not {shown[1]} (leave {option} out to "
                               "use the run's)")
    spec = facts or data.facts_path
    chosen = select_known(spec, templates=data.templates, relations=data.selected_relations, split_by=data.split_by,
                          seed=data.seed, max_facts=data.n_facts + data.n_dropped).facts
    # With facts dropped for want of an answer token (the run's tokenizer decides which) the sha256 cannot be
    # recomputed here; compare counts such facts as unplaced itself.
    if data.n_dropped == 0 and dataset_sha256(chosen) != data.facts_sha256:
        raise CompareError(f"{spec}: not the facts {run} analysed (their sha256 differs from analysis.json's)")
    return chosen, str(spec)


def select_facts(facts: str | Path | None, run: Path | None, split: str | None, max_facts: int | None = None,
                 seed: int = 0, relations: Sequence[str] | None = None, templates: str | None = None) -> Selection:
    """The facts to compare on (see the module doc), at most `max_facts` of them (whole subjects, seeded).
    `templates` None: the run's, else the default ones."""
    if split is not None and run is None:
        raise CompareError("--split needs --run RUN: the analysis run whose split to use")
    if run is not None:
        chosen, path = run_facts(run, facts, relations, templates)
    else:
        path = str(facts) if facts is not None else DEFAULT_FACTS
        chosen = load_facts(resolve_facts(facts), templates=templates or "default", relations=relations)
    if split is not None:
        chosen = [f for f in chosen if f.split == split]
        if not chosen:
            raise CompareError(f"{run}: its {split} split is empty")
    return Selection(subsample(chosen, max_facts, seed), path, run, split)


# -- asking the servers -------------------------------------------------------------------------------


async def score_all(endpoints: dict[str, Endpoint], facts: Sequence[Fact], config: CompareConfig,
                    ) -> dict[str, list[FactScore]]:
    """Every fact of every model, at most `config.concurrency` requests in flight per model; the first error stops
    all.

    By default one model after the other, never both at once: a server then never batches A's requests with B's.
    That is not only tidiness: vLLM 0.32's CPU LoRA path applies the adapter to every request of a batch that
    mixes adapter and base requests (measured on SmolLM2-135M: base requests sent alongside adapter ones came back
    with the adapter's log-probabilities, while sent alone they match Hugging Face). `config.together` asks both
    at once, for models on separate engines (a merged patch, or two servers)."""
    await asyncio.gather(*(e.check(facts[0]) for e in endpoints.values()))
    out: dict[str, list[FactScore]] = {key: [FactScore()] * len(facts) for key in endpoints}
    with tqdm(total=len(facts) * len(endpoints), desc="compare", unit="fact",
              disable=None if config.progress else True) as bar:

        async def model(key: str, endpoint: Endpoint) -> None:
            gate = asyncio.Semaphore(config.concurrency)

            async def one(i: int) -> tuple[int, FactScore]:
                async with gate:
                    return i, await endpoint.fact(facts[i])

            tasks = [asyncio.ensure_future(one(i)) for i in range(len(facts))]
            try:
                for done in asyncio.as_completed(tasks):
                    i, score = await done
                    out[key][i] = score
                    bar.update()
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

        if config.together:
            await asyncio.gather(*(model(key, endpoint) for key, endpoint in endpoints.items()))
        else:
            for key, endpoint in endpoints.items():
                await model(key, endpoint)
    return out


async def ask(urls: dict[str, str], models: dict[str, str], api_key: str | None, facts: Sequence[Fact],
              config: CompareConfig) -> tuple[dict[str, list[FactScore]], dict[str, ModelEndpoint]]:
    endpoints = {key: Endpoint(urls[key], models[key], api_key=api_key, timeout=config.timeout,
                               max_retries=config.max_retries, top_logprobs=config.top_logprobs,
                               extra_tokens=config.extra_tokens) for key in MODELS}
    try:
        scores = await score_all(endpoints, facts, config)
    finally:
        for e in endpoints.values():
            await e.aclose()
    return scores, {key: ModelEndpoint(model=e.model, base_url=e.url, retries=e.retries)
                    for key, e in endpoints.items()}


# -- statistics ---------------------------------------------------------------------------------------


def score_dist(scores: Sequence[FactScore], k: int) -> Dist:
    """The analysis' per-prompt record of placed facts. A rank beyond the top k is stored as k + 1: the
    statistics read rank only as rank == 1 (correct), which is exact."""
    def col(values: list, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype)

    return Dist(
        p_answer=col([s.p_answer for s in scores]),
        rank=col([s.rank if s.rank is not None else k + 1 for s in scores], torch.long),
        confidence=col([s.confidence for s in scores]),
        prediction=torch.zeros(len(scores), dtype=torch.long),  # token ids are not read; per_fact.jsonl has text
        nll=col([-np.log(s.p_answer) if s.p_answer > 0 else np.inf for s in scores]),
        brier=col([s.brier for s in scores]),
        top_logprobs=torch.tensor([padded(s.top_logprobs or [], CALIBRATION_TOP_K) for s in scores],
                                  dtype=torch.float64).reshape(len(scores), CALIBRATION_TOP_K),
    )


def padded(values: list[float], k: int) -> list[float]:
    """The first k of `values`, -inf after them where the server returned fewer (as `features` reads them)."""
    return [*values[:k], *[-math.inf] * (k - len(values[:k]))]


def score_columns(scores: Sequence[FactScore], k: int) -> cal.Columns:
    """What `METRICS` read: the calibration columns of `score_dist` and the answer-level ones."""
    return {**cal.columns(score_dist(scores, k)),
            "exact_match": np.asarray([bool(s.exact_match) for s in scores]),
            "answer_greedy": np.asarray([bool(s.answer_greedy) for s in scores]),
            "answer_logprob": np.asarray([s.answer_logprob for s in scores], dtype=np.float64)}


def compare_set(cols: dict[str, cal.Columns], groups: Sequence[str], n_boot: int, seed: int) -> Comparison:
    """Both models' metrics and B - A on one set of facts, bootstrap over `groups` (paired), and McNemar."""
    resamples = cal.group_resamples(groups, n_boot, seed)
    point = {key: {name: fn(o) for name, fn in METRICS.items()} for key, o in cols.items()}
    samples = {key: cal.sample_metrics(o, resamples, METRICS) for key, o in cols.items()}
    a, b = MODELS

    def mcnemar(column: str) -> McNemar:
        right_a, right_b = cols[a][column].astype(bool), cols[b][column].astype(bool)
        a_only, b_only = int((right_a & ~right_b).sum()), int((right_b & ~right_a).sum())
        return McNemar(a_only=a_only, b_only=b_only, p_value=cal.mcnemar_exact(a_only, b_only))

    return Comparison(
        n=len(groups), n_groups=len(set(groups)),
        models={key: {m: cal.estimate(point[key][m], samples[key][m]) for m in METRICS} for key in cols},
        difference={m: cal.estimate(point[b][m] - point[a][m], samples[b][m] - samples[a][m]) for m in METRICS},
        mcnemar={name: mcnemar(column) for name, column in MCNEMAR_COLUMNS.items()},
    )


def summarize(selection: Selection, scores: dict[str, list[FactScore]], endpoints: dict[str, ModelEndpoint],
              config: CompareConfig, command: str, runtime_s: float, calibration: Path | None = None,
              calibrators: dict[str, tuple[str, VariantCalibration]] | None = None) -> CompareResult:
    facts = selection.facts
    kept = [i for i in range(len(facts)) if all(scores[key][i].unplaced is None for key in MODELS)]
    if not kept:
        raise CompareError(f"{selection.path}: no fact could be placed for both models")
    k = config.top_logprobs
    cols = {key: score_columns([scores[key][i] for i in kept], k) for key in MODELS}
    dists = {key: score_dist([scores[key][i] for i in kept], k) for key in MODELS}
    groups = [subject_group(facts[i]) for i in kept]
    relations = [facts[i].relation or "(none)" for i in kept]
    by_relation = {}
    for relation in sorted(set(relations)):
        rows = np.asarray([j for j, r in enumerate(relations) if r == relation])
        by_relation[relation] = compare_set({key: {c: v[rows] for c, v in o.items()} for key, o in cols.items()},
                                            [groups[j] for j in rows], config.n_boot, config.seed)
    unplaced = [Unplaced(model=key, prompt=f.prompt, answer=f.answer, reason=scores[key][i].unplaced or "")
                for i, f in enumerate(facts) for key in MODELS if scores[key][i].unplaced is not None]
    return CompareResult(
        schema_version=COMPARE_SCHEMA_VERSION, tool_version=__version__,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), command=command, models=endpoints,
        facts=FactsInfo(path=str(selection.path), run=str(selection.run) if selection.run else None,
                        split=selection.split, n_facts=len(facts), n_compared=len(kept),
                        n_unplaced={key: sum(u.model == key for u in unplaced) for key in MODELS}, unplaced=unplaced,
                        relations={r: relations.count(r) for r in sorted(set(relations))}),
        settings=asdict(config), definitions=DEFINITIONS,
        overall=compare_set(cols, groups, config.n_boot, config.seed),
        reliability={key: cal.reliability_bins(dists[key]) for key in MODELS},
        by_relation=by_relation,
        confidence=confidence_comparison(dists, groups, config.n_boot, config.seed, calibration, calibrators),
        runtime_s=round(runtime_s, 2), files={},
    )


# -- the command --------------------------------------------------------------------------------------


def per_fact_lines(facts: Sequence[Fact], scores: dict[str, list[FactScore]]) -> str:
    lines = []
    for i, f in enumerate(facts):
        record = {k: v for k, v in asdict(f).items() if v is not None}
        record.update({key: scores[key][i].as_json() for key in MODELS})
        lines.append(json.dumps(record, ensure_ascii=False))
    return "\n".join(lines) + "\n"


def run_compare(base_url: str, models: Sequence[str], out: Path, *, facts: str | Path | None = None,
                base_url_b: str | None = None, api_key: str | None = None, run: Path | None = None,
                split: str | None = None, config: CompareConfig | None = None, command: str = "",
                force: bool = False, calibration: Path | None = None, calibrators: str = "base,auto",
                ) -> CompareResult:
    """Compare models[0] (A, at `base_url`) with models[1] (B, at `base_url_b` or `base_url`) and write `out`;
    with `calibration`, each model's confidence also after its calibrator (`calibrators`: "A,B" variants)."""
    from .report import print_table, write_report

    config = config or CompareConfig()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # it logs every request at INFO
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists (pass --force to replace it)")
    started = time.perf_counter()
    chosen = resolve_calibrators(calibration, calibrators, run) if calibration else None  # before the long part
    # The default templates stand for "not given", so that a --run's own are used.
    templates = config.templates if config.templates != CompareConfig.templates else None
    selection = select_facts(facts, run, split, config.max_facts, config.seed, config.relations, templates)
    urls = dict(zip(MODELS, (base_url, base_url_b or base_url), strict=True))
    scores, endpoints = asyncio.run(ask(urls, dict(zip(MODELS, models, strict=True)), api_key, selection.facts,
                                        config))
    result = summarize(selection, scores, endpoints, config, command, time.perf_counter() - started, calibration,
                       chosen)
    with atomic_directory(out, overwrite=force) as scratch:
        atomic_write_text(scratch / "per_fact.jsonl", per_fact_lines(selection.facts, scores))
        result = write_report(scratch, result)
    print_table(result)
    print(f"report: {out / 'report.md'}")
    return result


def add_cli(subcommands: argparse._SubParsersAction) -> None:
    p = subcommands.add_parser(
        "compare",
        help="A/B-compare two models over any OpenAI-compatible server on a facts set",
        description=__doc__.split("\n\n")[0] + " Per fact: the answer's log-likelihood from echo logprobs, its "
                    "first token's probability and rank, greedy generation and exact match. Accuracy, p(answer), "
                    "ECE, Brier, NLL and AUROC per model and relation with bootstrap intervals, B - A with McNemar's "
                    "test. Writes OUT/{report.md, results.json, per_fact.jsonl, reliability.png}.",
    )
    p.add_argument("--base-url", required=True, help="the server of model A (and B), e.g. http://127.0.0.1:8000")
    p.add_argument("--models", required=True, nargs=2, metavar=("A", "B"), help="the two model names to compare")
    p.add_argument("--base-url-b", default=None, help="model B's server, when it is another one")
    p.add_argument("--api-key", default=None, help="bearer token for the server(s)")
    p.add_argument("--facts", default=None, metavar="NAME|PATH",
                   help=f"{FACTS_HELP} (default: the --run's facts, or shipped)")
    p.add_argument("--run", type=Path, default=None, help="an analysis run (RUN of `recallfix analyze`): its facts")
    p.add_argument("--split", choices=SPLITS, default=None, help="with --run: only this split of its facts")
    p.add_argument("--out", required=True, type=Path, help="directory to write")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--calibration", type=Path, default=None, metavar="FILE",
                   help="a calibration.json of `recallfix analyze`: ECE, selective accuracy and the risk-coverage "
                        "area also after each model's calibrator")
    p.add_argument("--calibrators", default="base,auto", metavar="A,B",
                   help="with --calibration: the file's variants of A and B (auto for B: the --run's recommended "
                        "patch, else the file's only patch; default base,auto)")
    add_options(p, CompareConfig)
    p.set_defaults(func=cmd_compare)


def command_line(argv: Sequence[str]) -> str:
    """The command line as results.json records it, the API key left out."""
    shown = list(argv)
    for i, arg in enumerate(shown):
        if arg == "--api-key" and i + 1 < len(shown):
            shown[i + 1] = "***"
        elif arg.startswith("--api-key="):
            shown[i] = "--api-key=***"
    return "recallfix " + shlex.join(shown)


def cmd_compare(args: argparse.Namespace) -> int:
    run_compare(args.base_url, args.models, args.out, facts=args.facts, base_url_b=args.base_url_b,
                api_key=args.api_key, run=args.run, split=args.split, config=from_args(CompareConfig, args),
                command=command_line(sys.argv[1:]), force=args.force, calibration=args.calibration,
                calibrators=args.calibrators)
    return 0
