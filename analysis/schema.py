"""The shape of RUN/analysis.json (pydantic), exported as `analysis.schema.json`.

Each model is built where its numbers are computed (`mechanism.summaries`, `evaluate`, `calibration`, `pipeline`) and
the report renders the finished `AnalysisResult`. Numbers that can be undefined (an AUROC when every prompt
is right, a statistic of an empty set) are null, never NaN, so the file is strict JSON.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from recallfix.patches.io import json_schema_of, write_json_schema_of

SCHEMA_VERSION = 4
SCHEMA_PATH = Path(__file__).with_name("analysis.schema.json")

Num = float | None


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- setup ------------------------------------------------------------------------------------------
class ModelInfo(Strict):
    path: str
    architecture: str
    num_layers: int
    num_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    dtype: str
    device: str


class FactsCleaning(Strict):
    """What the facts reader changed in one file (`data.clean`): values repaired and samples dropped, counted."""

    file: str
    samples: int = Field(description="samples read (a relation file's samples, a JSONL file's records)")
    kept: int = Field(description="samples left after the drops")
    whitespace: int = Field(description="values stripped of surrounding whitespace")
    escapes: int = Field(description="values whose literal \\uXXXX escapes were decoded")
    duplicates: int = Field(description="exact duplicate samples dropped")
    ambiguous: int = Field(description="samples dropped whose question (a subject; in JSONL, a prompt) has several "
                                       "answers")


class DataInfo(Strict):
    facts_path: str = Field(description="the facts file or folder, or the name of a packaged set (shipped, lre)")
    facts_sha256: str = Field(description="sha256 of the facts used, splits included (as in the patch)")
    n_facts: int
    n_dropped: int = Field(description="facts dropped because no answer token could be found")
    splits: dict[str, int]
    relations: dict[str, int]
    unknown_path: str | None
    unknown_source: str = Field(description="where the unknown-subject prompts come from")
    n_unknown: int
    neutral_source: str
    n_neutral_fit: int
    n_neutral_eval: int
    seed: int
    # Defaults: what a run made before these settings existed did.
    templates: str = Field("default", description="the templates of relation files: default or zs (zero-shot)")
    selected_relations: list[str] | None = Field(None, description="--relations: only these were read (null: all)")
    split_by: str = Field("subject", description="what stays together in one split: subject or relation")
    split_relations: dict[str, list[str]] = Field(default_factory=dict,
                                                  description="split -> the relations with prompts in it")
    cleaning: list[FactsCleaning] = Field(default_factory=list,
                                          description="what the reader changed, per facts file that needed it")


# -- 1. logit lens ----------------------------------------------------------------------------------
class LensCurve(Strict):
    n: int
    mean_p_answer: list[Num] = Field(description="index l: after l blocks (0 = embeddings, L = model output)")
    median_rank: list[Num]
    accuracy: list[Num]


class LogitLens(Strict):
    num_layers: int
    all: LensCurve
    by_relation: dict[str, LensCurve]


# -- 2. final-layer decomposition ---------------------------------------------------------------------
class ComponentRow(Strict):
    name: str
    mean_dla: Num = Field(description="mean DLA to the answer against the mean logit (frozen final norm)")
    std_dla: Num
    share_dla_negative: Num = Field(description="share of prompts where DLA < 0")
    mean_effect: Num = Field(description="mean effect on log p(answer) of the write (real final norm)")
    share_effect_negative: Num = Field(description="share of prompts where the effect on log p(answer) < 0")


class FinalLayer(Strict):
    layer: int
    n_prompts: int
    components: list[ComponentRow]
    rescale: ComponentRow = Field(description="the final norm's change of scale (DLA columns only)")
    mean_change_logit: Num = Field(description="mean change of z_answer - mean z across the block = sum DLA + rescale")
    mean_change_logp: Num = Field(description="mean change of log p(answer) across the block")
    neurons_suppressing: list[ComponentRow]
    neurons_promoting: list[ComponentRow]


# -- 3. mechanisms ----------------------------------------------------------------------------------
class MoverRow(Strict):
    name: str
    mean_attention: Num = Field(description="attention from the last position to the subject tokens")
    mean_subject_attribution: Num = Field(description="DLA of the head's write to the subject's first token")
    correlation: Num = Field(description="Pearson r of the two over prompts")
    is_mover: bool


class Movers(Strict):
    n_prompts: int
    min_attention: float
    heads: list[MoverRow]
    movers: list[str]
    scatter: dict[str, list[list[float]]] = Field(
        description="per plotted head: [attention, attribution] of each prompt (a sample of at most 500)")


class BetaRow(Strict):
    name: str
    mean_beta: Num
    median_beta: Num
    share_amplify: Num = Field(description="share of prompts with beta > 1")
    share_erase: Num = Field(description="share of prompts with beta < 0")


class InterceptRow(Strict):
    mean_dla: Num = Field(description="mean DLA of the intercept to the answer")
    share_dla_positive: Num
    median_answer_rank: Num = Field(description="median rank of the answer among the intercept's lens logits")
    share_answer_top10: Num


class MlpRegression(Strict):
    layer: int
    name: str
    mean_r2: Num
    mean_mlp_dla: Num = Field(description="mean DLA of the whole MLP write to the answer")
    heads: list[BetaRow]
    intercept: InterceptRow


class Mechanisms(Strict):
    n_prompts: int = Field(description="prompts the logit lens, the MLP regressions and the mover heads cover (a "
                                       "seeded sample of the facts when there are more than mechanism_prompts)")
    movers: Movers | None
    mlp_regression: list[MlpRegression]
    answer_mlp: str | None = Field(description="the MLP whose intercept points at the answer most (mean DLA)")


# -- 4. verdict -------------------------------------------------------------------------------------
class Suppression(Strict):
    n: int
    mean_p_before: Num = Field(description="p(answer) from the stream entering the final block (logit lens)")
    mean_p_after: Num = Field(description="p(answer) of the model")
    share_suppressed: Num = Field(description="share of prompts where p_after < p_before")
    share_suppressed_ci: list[Num] = Field(description="95% bootstrap interval over subjects")
    accuracy_before: Num
    accuracy_after: Num
    n_recalled: int = Field(description="prompts whose answer is top-1 before the final block")
    share_suppressed_recalled: Num


class ComponentFinding(Strict):
    name: str
    share_lowers: Num = Field(description="share of test prompts where its write lowers log p(answer)")
    share_lowers_ci: list[Num] = Field(description="95% bootstrap interval over subjects")
    mean_effect: Num = Field(description="mean effect of its write on log p(answer), nats")
    mean_effect_ci: list[Num]
    consistent: bool = Field(description="a consistent suppressor: lowers p(answer) on at least min_share of "
                                         "prompts and the interval of its mean effect lies below 0")


class Findings(Strict):
    """What the final block does to the answer, at two levels: the whole block and each component."""

    layer: int
    test: Suppression
    all: Suppression
    rescale: EstimateModel = Field(description="mean change of the answer's logit against the mean from the final "
                                               "norm's new scale (test split)")
    block_lowers: bool = Field(description="the block lowers p(answer) on most test prompts")
    components: list[ComponentFinding] = Field(description="the final block's components, most suppressing first")
    suppressors: list[str] = Field(description="the consistent suppressors")
    text: str


# -- 5. patch and evaluation ------------------------------------------------------------------------
class EstimateModel(Strict):
    value: Num
    ci_low: Num
    ci_high: Num


Metrics = dict[str, EstimateModel]


class ReliabilityBin(Strict):
    lo: float
    hi: float
    count: int
    confidence: Num
    accuracy: Num


class SetEvaluation(Strict):
    n: int
    n_groups: int = Field(description="subjects: the bootstrap resamples these")
    models: dict[str, Metrics] = Field(description="base, patched, temperature -> metric -> estimate")
    differences: dict[str, Metrics] = Field(description="patched_minus_base, patched_minus_temperature (paired)")
    reliability: dict[str, list[ReliabilityBin]]


class NeutralEvaluation(Strict):
    n_lines: int
    n_tokens: int
    base_nll: float
    patched_nll: float
    relative_change: float
    relative_change_ci: list[Num]


class FitHistoryRow(Strict):
    epoch: int
    guard_weight: float = Field(description="weight of the guard during this epoch")
    train_objective: Num
    dev_objective: Num
    dev_nll: Num
    dev_kl_unrecalled: Num
    dev_kl_neutral: Num
    dev_confidence_rise_unrecalled: Num = Field(
        description="mean rise of the top-1 probability on dev prompts the model does not recall (and nonce ones)")


class PatchInfo(Strict):
    file: str
    id: str
    selection_rule: str
    candidates: list[ComponentRow] = Field(description="the selected components' training-split statistics")
    gains: dict[str, float]
    fit_config: dict[str, Any]
    n_train: int
    n_train_recalled: int
    n_dev: int
    n_nonce_train: int = Field(description="made-up-subject prompts from the train templates, KL-guarded")
    n_nonce_dev: int
    nonce_examples: list[str]
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    history: list[FitHistoryRow]
    temperature: float = Field(description="the baseline's T, fitted on the same train split")
    verified: bool = Field(description="the saved patch applied with apply_patch reproduces the fitted logits")
    max_verify_error: float


class InterceptInfo(Strict):
    """The paper's fix: the final MLP's output regressed on the final heads' writes and the stream after
    attention across train prompts; the shared intercept b is removed (a bias of -b on the MLP's output)."""

    file: str
    id: str
    component: str
    n_train: int
    head_coef: dict[str, float]
    resid_coef: float
    r2: Num
    b_norm: float = Field(description="Euclidean norm of the intercept b")
    mean_mlp_out_norm: float = Field(description="mean norm of the MLP's output on the train prompts, for scale")


class MethodInfo(Strict):
    name: str = Field(description="gains, suppress or intercept")
    file: str
    patch_id: str
    dev_nll: float = Field(description="mean NLL of the answer on the dev split with the patch applied")
    dev_nll_change: EstimateModel = Field(description="dev NLL minus the base model's, paired interval (subjects)")
    dev_accuracy_change: EstimateModel = Field(description="dev accuracy minus the base model's, paired interval")
    merged: str | None = Field(description="why a merged checkpoint cannot carry it (null: it can)")
    lora: str | None = Field(description="why a LoRA adapter cannot carry it (null: it can)")


class AmplifiedComponent(Strict):
    """A component a fit amplified (gain > 1), alone at its gain on the test split: its change of log p(answer)
    in total and along each path alone (direct, through the final MLP, through the final norm's rescale), and
    the change of the answer's logit along each path (these sum to the real change)."""

    name: str
    gain: float
    total: EstimateModel
    paths: dict[str, EstimateModel] = Field(description="direct, mlp, rescale -> change of log p(answer)")
    answer_logit: dict[str, EstimateModel] = Field(description="direct, mlp, rescale -> change of the answer's logit")


class RelationEvaluation(Strict):
    n: int
    n_groups: int
    models: dict[str, Metrics] = Field(description="model -> accuracy, mean_p_answer, ece_equal_width, nll")
    differences: dict[str, Metrics] = Field(description="<method>_minus_base (paired)")


class CalibratorFamilyScore(Strict):
    family: str
    log_loss: Num = Field(description="on dev prompts held out of the fit (the folds of `CalibrationSummary.folds`)")
    ece: Num
    aurc: Num


class VariantConfidence(Strict):
    """One variant's calibrator (`calibration.json`): its family chosen on dev, then measured on the test split
    against the raw top-1 probability, with paired cluster-bootstrap intervals."""

    calibrator_id: str = Field(description="what a served reply names as its calibrator")
    family: str
    choice: str = Field(description="why this family, in words")
    families: list[CalibratorFamilyScore]
    raw: Metrics = Field(description="test split, the raw top-1 probability: ece, brier, log_loss, "
                                     "selective_accuracy_50, selective_accuracy_80, aurc")
    calibrated: Metrics
    difference: Metrics = Field(description="calibrated minus raw (paired)")
    reliability_raw: list[ReliabilityBin]
    reliability_calibrated: list[ReliabilityBin]
    risk_coverage_raw: list[Num] = Field(description="risk at coverage 5%, 10%, ..., 100% (20 points)")
    risk_coverage_calibrated: list[Num]
    by_relation: dict[str, dict[str, Num]] = Field(
        description="test relation -> n, ece_raw, ece_calibrated, aurc_raw, aurc_calibrated")


class CalibrationSummary(Strict):
    file: str = Field(description="the calibration file beside the patches")
    top_k: int = Field(description="first-token log-probabilities a calibrator reads")
    n_dev: int
    folds: str = Field(description="how the families were compared on dev, in words")
    variants: dict[str, VariantConfidence] = Field(description="base and each patch's method")


class Evaluation(Strict):
    n_boot: int = Field(description="bootstrap resamples behind every interval")
    temperature: float = Field(description="the temperature baseline's T, fitted (NLL) on the train split")
    base_dev_nll: float
    methods: list[MethodInfo]
    chosen: str | None = Field(description="the method written as patch.json; null: no patch is recommended")
    choice: str = Field(description="why it was chosen (or none was), in words")
    test: SetEvaluation
    unknown: SetEvaluation | None
    neutral: dict[str, NeutralEvaluation] = Field(description="per method: NLL on held-out neutral text")
    by_relation: dict[str, RelationEvaluation]
    suppression_after_patch: dict[str, Suppression] = Field(description="the block-level numbers on the test "
                                                                        "split, per method, patched")
    amplified: dict[str, list[AmplifiedComponent]] = Field(
        default_factory=dict, description="per gain fit: what each component with a gain above 1 does to the answer")
    calibration: CalibrationSummary | None = Field(
        default=None, description="the confidence calibrators of calibration.json, chosen on dev, measured on test")


class CheckResult(Strict):
    name: str
    expression: str = Field(description="finding, comparison and threshold, e.g. 'block.lowers_share >= 0.8'")
    description: str
    source: str = Field(description="the check set or file it comes from, or 'command line'")
    value: Num
    ci_low: Num
    ci_high: Num
    passed: bool = Field(description="on the point estimate; an unmeasured finding fails")


class AnalysisResult(Strict):
    schema_version: int
    tool_version: str
    created: str
    command: str
    inputs_key: str = Field(description="sha256 of everything the run depends on (recallfix version, model "
                                        "files, facts, unknown and neutral sets, settings): `recallfix demo` "
                                        "reuses a run whose key matches")
    model: ModelInfo
    data: DataInfo
    logit_lens: LogitLens
    final_layer: FinalLayer
    mechanisms: Mechanisms
    findings: Findings
    patch: PatchInfo | None = Field(description="the learned free gains; null when not asked for or no component "
                                                "suppresses the answer")
    suppress: PatchInfo | None = Field(default=None, description="the learned gains bounded to [0, 1] (suppressors "
                                                                 "scaled down only); null as for `patch`")
    intercept: InterceptInfo | None = Field(description="the paper's intercept fix; null when not asked for")
    evaluation: Evaluation | None
    values: dict[str, EstimateModel] = Field(description="every finding a --require check can name")
    checks: list[CheckResult] = Field(description="the checks asked for with --require")
    runtime_s: dict[str, float]
    files: dict[str, str]


def json_schema() -> dict[str, Any]:
    return json_schema_of(AnalysisResult, "recallfix analysis", SCHEMA_PATH)


def write_json_schema(path: Path = SCHEMA_PATH) -> Path:
    return write_json_schema_of(AnalysisResult, "recallfix analysis", path)


if __name__ == "__main__":  # python -m recallfix.analysis.schema: regenerate the schema file
    print(write_json_schema())
