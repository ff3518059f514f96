"""`AnalysisConfig`, the one statement of the analysis's settings.

Each field's default and help text are written here once; `recallfix.patches.options` turns every field that
has a help text into an argparse option (`batch_size` -> `--batch-size`, a bool defaulting to True ->
`--no-progress`, a tuple -> a comma-separated list) and reads them back, so `recallfix analyze` and
`recallfix demo` cannot drift from the defaults of `run_analysis`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from recallfix.patches.io import DTYPES
from recallfix.patches.options import option as _opt  # a field that is a CLI option

METHODS = ("gains", "suppress", "intercept")  # the patch candidates a run can fit, in the order they are fitted


@dataclass(frozen=True)
class FitConfig:
    """The gain fit's settings (`learn.fit`), nested in `AnalysisConfig.fit`; not on the command line."""

    lr: float = 0.05
    max_epochs: int = 40
    patience: int = 5
    l2: float = 0.01  # weight of sum (g - 1)^2, the pull toward the base model
    kl_weight: float = 1.0  # weight of the KL guard on neutral text
    guard_weight: float = 1.0  # initial weight of the KL guard on prompts the model does not recall
    max_confidence_rise: float | None = 0.05  # budget on the guarded dev prompts' mean top-1 rise (None: off)
    guard_growth: float = 3.0  # the guard weight is multiplied by this after an epoch over budget
    min_gain: float = 0.0
    max_gain: float = 2.0
    recalled_per_step: int = 32  # recalled train facts in each training step (an epoch is one pass over them)
    guarded_per_step: int = 64  # other train prompts in each training step's KL guard (0: all of them)
    neutral_per_step: int = 64  # neutral positions in each training step's KL guard (0: all of them)
    seed: int = 0


RELATIONS_HELP = "only the facts of these relations: comma-separated names as the facts carry them (their 'name')"
TEMPLATES_HELP = "the prompts of relation files: their prompt_templates (default) or zero-shot prompt_templates_zs (zs)"


@dataclass(frozen=True)
class AnalysisConfig:
    seed: int = _opt(0, "splits, fit and bootstrap seed")
    batch_size: int = _opt(32, "prompts per forward pass")
    device: str = _opt("auto", "auto (cuda when available), cpu, cuda, cuda:1, ...")
    dtype: str = _opt("auto", f"auto (float32 on CPU, bfloat16 on GPU), {', '.join(DTYPES)}")
    max_facts: int | None = _opt(None, "use at most N fact prompts (whole subjects, chosen by the seed; by relation: "
                                       "at least one subject of each relation)", metavar="N")
    # The choices are data.facts.TEMPLATE_KEYS and data.splits.SPLIT_BY (this module imports no folder).
    relations: tuple[str, ...] | None = _opt(None, RELATIONS_HELP, metavar="NAMES")
    templates: str = _opt("default", TEMPLATES_HELP, choices=("default", "zs"))
    split_by: str = _opt("subject", "what stays together in one split: subject (the prompts of a fact never cross "
                                    "splits) or relation (whole relations: the test split holds relations the fit "
                                    "and the dev split never saw; needs 3 relations)", choices=("subject", "relation"))
    n_boot: int = _opt(1000, "bootstrap resamples for the intervals")
    mlp: str = _opt("whole", "how the final MLP enters the patch", choices=("whole", "neurons", "none"))
    max_neurons: int = _opt(32, "with --mlp neurons: at most N neurons", metavar="N")
    min_share: float = _opt(0.5, "a component suppresses when its effect on log p(answer) is < 0 on average "
                                 "and on at least this share of train prompts")
    recall_rank: int = _opt(1, "train facts whose answer ranks at most this before the final block are fitted")
    nonce_per_template: int = _opt(8, "made-up subjects per training template, KL-guarded (0: no nonce guard)")
    unknown_per_template: int = _opt(8, "without --unknown or MODEL/unknown_facts.jsonl, the unknown subjects are "
                                        "each test template filled with N invented subjects")
    method: str = _opt("all", "gains: free gains (0 to 2) on the components that suppress the answer; suppress: "
                              "gains in [0, 1] on them (the paper's and PEAR's form: suppressors scaled down only); "
                              "intercept: the paper's fix (remove the final MLP's intercept); all: every one of them. "
                              "patch.json is the candidate with the lowest dev NLL among those that lower it beyond "
                              "its interval, or none", choices=("all", *METHODS))
    require: tuple[str, ...] | None = _opt(
        None, "turn findings into checks (exit code 1 when one fails), comma-separated: a shipped check set "
              "(demo), a check-set file, or 'FINDING OP NUMBER', e.g. 'block.lowers_share>=0.8' (findings: "
              "analysis.json 'values')", metavar="CHECKS")
    components: tuple[str, ...] | None = _opt(
        None, "fit gains on exactly these final-layer components, comma-separated (e.g. L11H3,L11MLP) instead "
              "of the ones found to suppress the answer", metavar="NAMES")
    mechanism_prompts: int = _opt(384, "the logit lens through the layers, the MLP regressions and the mover heads "
                                       "on a seeded sample of at most N prompts (about 60 full-vocabulary readouts "
                                       "each); the final block's findings use every prompt (0: all)", metavar="N")
    report_neurons: int = _opt(10, "neurons listed in the report, each way")
    min_attention: float = _opt(0.3, "mover heads: mean attention to the subject at least this")
    fit: FitConfig = field(default_factory=FitConfig)  # not on the command line
    progress: bool = _opt(True, "progress bars and log lines")

    @property
    def methods(self) -> tuple[str, ...]:
        return METHODS if self.method == "all" else (self.method,)


@dataclass(frozen=True)
class CompareConfig:
    """The settings of `recallfix compare` (its servers, models and files are plain options of the command)."""

    concurrency: int = _opt(8, "requests in flight at once per model (the models are asked one after the other "
                               "unless --together)")
    together: bool = _opt(False, "ask both models at once: only where they run on separate engines (recallfix "
                                 "serve --patch-mode merged, or --base-url-b); vLLM's CPU LoRA path applies an "
                                 "adapter to the base requests it batches with adapter ones")
    top_logprobs: int = _opt(20, "top log-probabilities asked per position (k; vLLM allows up to its --max-logprobs, "
                                 "default 20); an answer ranked below them has rank '> k'", metavar="K")
    extra_tokens: int = _opt(3, "greedy generation: the answer's token count plus this many tokens")
    max_facts: int | None = _opt(None, "compare about N of the facts (after --split): whole subjects in an order "
                                       "drawn by --seed until N are reached, as analyze --max-facts draws them",
                                 metavar="N")
    max_retries: int = _opt(6, "retries of a request answered 429 or 503, backing off exponentially from 0.5 s")
    timeout: float = _opt(600.0, "seconds to wait for one answer", metavar="S")
    relations: tuple[str, ...] | None = _opt(AnalysisConfig.relations, RELATIONS_HELP + " (with --run: the run's)",
                                             metavar="NAMES")
    templates: str = _opt(AnalysisConfig.templates, TEMPLATES_HELP + " (with --run: the run's)",
                          choices=("default", "zs"))
    n_boot: int = _opt(AnalysisConfig.n_boot, "bootstrap resamples (of subjects) for the intervals")
    seed: int = _opt(AnalysisConfig.seed, "bootstrap seed (and which subjects --max-facts keeps)")
    progress: bool = _opt(True, "progress bar (drawn only on a terminal)")
