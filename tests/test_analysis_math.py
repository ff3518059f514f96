"""The analysis's pure functions: calibration metrics, bootstrap, temperature, regression, movers, batching."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from recallfix.analysis import calibration as cal
from recallfix.analysis.data.batching import batches, subject_token_mask
from recallfix.analysis.mechanism.attribution import ColumnStats, select_suppressors, summarize, top_neurons
from recallfix.analysis.mechanism.lens import answer_stats
from recallfix.analysis.mechanism.movers import attention_to_subject, pearson, summarize_movers
from recallfix.analysis.mechanism.regression import regress
from recallfix.analysis.records import Dist

# -- calibration ------------------------------------------------------------------------------------


def _ece_by_definition(conf: np.ndarray, correct: np.ndarray, bins: list[np.ndarray]) -> float:
    return sum(len(b) * abs(correct[b].mean() - conf[b].mean()) for b in bins if len(b)) / len(conf)


def test_ece_floor_is_the_expected_ece_of_a_perfectly_calibrated_confidence() -> None:
    import math

    # One bin of 5 prompts at confidence 0.3: E|K - 1.5| / 5 over K ~ Binomial(5, 0.3), by enumeration.
    by_hand = sum(math.comb(5, k) * 0.3**k * 0.7 ** (5 - k) * abs(k - 1.5) for k in range(6)) / 5
    assert cal.ece_floor(cal.reliability_of(np.full(5, 0.3), np.zeros(5, dtype=bool))) == pytest.approx(by_hand)
    # Many bins: the mean ECE of answers drawn right with their own confidence (each bin's prompts at one value).
    rng = np.random.default_rng(0)
    conf = rng.choice([0.05, 0.12, 0.3, 0.55, 0.8, 0.97], size=300)
    simulated = np.mean([cal.ece_equal_width(conf, rng.random(300) < conf) for _ in range(4000)])
    floor = cal.ece_floor(cal.reliability_of(conf, np.zeros(300, dtype=bool)))  # correctness does not enter it
    assert floor == pytest.approx(simulated, rel=0.03)
    assert cal.ece_floor(cal.reliability_of(np.full(4000, 0.3), np.zeros(4000, dtype=bool))) < by_hand / 10


def test_ece_equal_width_matches_definition() -> None:
    rng = np.random.default_rng(0)
    conf = rng.uniform(0, 1, 500)
    correct = rng.uniform(0, 1, 500) < conf**2
    conf[:3] = [0.0, 1.0, 14 / 15]  # edges: 1.0 belongs to the last bin, 14/15 starts it
    edges = np.linspace(0, 1, 16)
    bins = [np.flatnonzero((conf >= lo) & ((conf < hi) if hi < 1 else (conf <= hi)))
            for lo, hi in itertools.pairwise(edges)]
    assert sum(len(b) for b in bins) == 500
    assert cal.ece_equal_width(conf, correct) == pytest.approx(_ece_by_definition(conf, correct, bins))


def test_ece_equal_mass_matches_definition() -> None:
    rng = np.random.default_rng(1)
    conf = rng.uniform(0, 1, 101)
    correct = rng.uniform(0, 1, 101) < conf
    order = np.argsort(conf)
    bins = np.array_split(order, 15)
    assert {len(b) for b in bins} == {6, 7}
    assert cal.ece_equal_mass(conf, correct) == pytest.approx(_ece_by_definition(conf, correct, bins))


def test_ece_is_zero_when_calibrated_per_bin_and_large_when_overconfident() -> None:
    conf = np.repeat([0.1, 0.5, 0.9], 10)
    correct = np.array([1] + [0] * 9 + [1] * 5 + [0] * 5 + [1] * 9 + [0], dtype=bool)
    assert cal.ece_equal_width(conf, correct) == pytest.approx(0.0, abs=1e-12)
    assert cal.ece_equal_width(np.full(10, 0.95), np.zeros(10, bool)) == pytest.approx(0.95)


def test_auroc_matches_pairwise_definition_with_ties() -> None:
    rng = np.random.default_rng(2)
    score = rng.integers(0, 5, 60).astype(float)  # many ties
    label = rng.uniform(size=60) < 0.4
    pos, neg = score[label], score[~label]
    pairs = [(p > n) + 0.5 * (p == n) for p in pos for n in neg]
    assert cal.auroc(score, label) == pytest.approx(np.mean(pairs))
    assert np.isnan(cal.auroc(score, np.ones(60, bool)))


def test_brier_and_nll_from_logits() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    answers = torch.tensor([0, 2])
    stats = answer_stats(logits, answers)
    p = logits.softmax(-1)
    onehot = torch.nn.functional.one_hot(answers, 3).float()
    assert torch.allclose(stats.brier, ((p - onehot) ** 2).sum(-1))
    assert torch.allclose(stats.nll, -p[[0, 1], answers].log())
    assert stats.rank.tolist() == [1, 1]  # a three-way tie still ranks the answer first
    assert stats.correct.tolist() == [True, True]


def test_temperature_fit_recovers_the_generating_temperature() -> None:
    torch.manual_seed(0)
    true_t = 2.5
    logits = torch.randn(4000, 20) * 3
    answers = torch.distributions.Categorical(logits=logits / true_t).sample()
    t = cal.fit_temperature(lambda: iter([(logits[:2000], answers[:2000]), (logits[2000:], answers[2000:])]))
    assert t == pytest.approx(true_t, rel=0.08)
    # and it minimises the NLL: nearby temperatures are worse
    def nll(temp: float) -> float:
        return float(-(logits / temp).log_softmax(-1)[torch.arange(4000), answers].mean())
    assert nll(t) <= min(nll(t * 0.95), nll(t * 1.05))


def test_cluster_bootstrap_draws_whole_groups_and_is_seeded() -> None:
    groups = ["a", "a", "b", "c", "c", "c"]
    resamples = cal.group_resamples(groups, 20, seed=3)
    for rows in resamples:
        for g in set(groups):
            members = [i for i, x in enumerate(groups) if x == g]
            counts = {i: int((rows == i).sum()) for i in members}
            assert len(set(counts.values())) == 1  # all prompts of a group come together
    again = cal.group_resamples(groups, 20, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(resamples, again, strict=True))


def _dist(confidence: np.ndarray, correct: np.ndarray, p_answer: np.ndarray, brier: np.ndarray) -> Dist:
    n = len(confidence)
    return Dist(p_answer=torch.from_numpy(p_answer), rank=torch.from_numpy(np.where(correct, 1, 2)),
                confidence=torch.from_numpy(confidence), prediction=torch.zeros(n, dtype=torch.long),
                nll=torch.from_numpy(-np.log(p_answer)), brier=torch.from_numpy(brier),
                top_logprobs=torch.from_numpy(np.log(confidence))[:, None])


def test_bootstrap_interval_covers_point_and_differences_are_paired() -> None:
    rng = np.random.default_rng(4)
    n = 300
    conf = rng.uniform(0.2, 0.9, n)
    correct = rng.uniform(size=n) < conf
    base = _dist(conf, correct, conf * 0.8, 1 - conf)
    better = _dist(conf, correct, conf * 0.9, 1 - conf)
    groups = [str(i // 3) for i in range(n)]
    resamples = cal.group_resamples(groups, 200, seed=0)
    sb, sp = cal.bootstrap_samples(base, resamples), cal.bootstrap_samples(better, resamples)
    est = cal.estimates(base, sb)
    for name in ("accuracy", "mean_p_answer", "nll", "brier"):  # means: unbiased, the point sits inside
        e = est[name]
        assert e.ci_low <= e.value <= e.ci_high, name
    diff = cal.differences(better, base, sp, sb)["mean_p_answer"]
    # p differs by exactly 0.1 * conf on every prompt: a paired interval is tight and excludes 0
    assert diff.value == pytest.approx(0.1 * conf.mean())
    assert 0 < diff.ci_low <= diff.value <= diff.ci_high
    assert diff.ci_high - diff.ci_low < 0.02


# -- regression -------------------------------------------------------------------------------------


def test_regression_recovers_coefficients_and_orthogonal_intercept() -> None:
    torch.manual_seed(0)
    heads = torch.randn(5, 3, 64)
    beta = torch.tensor([[1.5, 0.2, -0.7]]).repeat(5, 1)
    noise = torch.randn(5, 64)
    # make the intercept orthogonal to every head, so the regression must give it back exactly
    q, _ = torch.linalg.qr(heads.transpose(1, 2))
    noise = noise - (q @ (q.transpose(1, 2) @ noise.unsqueeze(-1))).squeeze(-1)
    target = (beta.unsqueeze(-1) * heads).sum(1) + noise
    reg = regress(target, heads)
    assert torch.allclose(reg.beta, beta, atol=1e-4)
    assert torch.allclose(reg.intercept, noise, atol=1e-4)
    expected_r2 = 1 - noise.pow(2).sum(-1) / target.pow(2).sum(-1)
    assert torch.allclose(reg.r2, expected_r2, atol=1e-5)


def test_regression_survives_collinear_heads() -> None:
    h = torch.randn(2, 1, 16)
    heads = torch.cat([h, 2 * h], dim=1)  # rank 1
    reg = regress(3 * h[:, 0], heads)
    fitted = (reg.beta.unsqueeze(-1) * heads).sum(1)
    assert torch.allclose(fitted, 3 * h[:, 0], atol=1e-4)
    assert torch.isfinite(reg.beta).all()


# -- movers -----------------------------------------------------------------------------------------


def test_attention_to_subject_sums_the_subject_columns() -> None:
    torch.manual_seed(0)
    rows = torch.rand(2, 2, 3, 5).softmax(-1)  # [batch, layers, heads, keys]
    mask = torch.tensor([[0, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    out = attention_to_subject(rows, mask)
    assert out.shape == (2, 2, 3)
    assert torch.allclose(out[0, 1, 2], rows[0, 1, 2, 1] + rows[0, 1, 2, 2])
    assert torch.allclose(out[1, 0, 0], rows[1, 0, 0, 0])


def test_pearson_and_mover_flags() -> None:
    torch.manual_seed(0)
    attention = torch.rand(50, 1, 2) * 0.5 + 0.3
    attribution = torch.stack([2 * attention[:, 0, 0] + 0.1, -attention[:, 0, 1]], dim=1).unsqueeze(1)
    r = pearson(attention, attribution)
    assert r[0, 0] == pytest.approx(1.0, abs=1e-6) and r[0, 1] == pytest.approx(-1.0, abs=1e-6)
    heads = {h.name: h for h in summarize_movers(attention, attribution, min_attention=0.3)}
    assert heads["L0H0"].is_mover and not heads["L0H1"].is_mover
    assert torch.isnan(pearson(torch.ones(4, 1), torch.randn(4, 1))).all()  # constant: undefined, not 0


# -- attribution summaries and selection ------------------------------------------------------------


def test_summarize_and_select_suppressors() -> None:
    values = torch.tensor([[-1.0, 0.5, -0.2], [-2.0, -0.5, 0.1], [1.0, 0.3, -0.1]])
    stats = summarize(values, ["L3H0", "L3H1", "L3MLP"])
    assert stats[0].mean == pytest.approx(-2 / 3) and stats[0].share_negative == pytest.approx(2 / 3)
    assert stats[1].mean > 0
    chosen = select_suppressors(stats, [ColumnStats("L3N7", -0.1, 0.0, 0.9)], mlp="neurons")
    assert chosen == ["L3H0", "L3N7"]
    assert select_suppressors(stats, [], mlp="whole") == ["L3H0", "L3MLP"]
    assert select_suppressors(stats, [], mlp="whole", min_share=0.9) == []
    assert top_neurons(torch.tensor([[0.0, -3.0, 1.0, -1.0]]), 3, 2) == [1, 3]
    with pytest.raises(ValueError, match="mlp must be"):
        select_suppressors(stats, [], mlp="half")


# -- batching ---------------------------------------------------------------------------------------


def test_batches_are_right_padded_sorted_and_cover_every_row() -> None:
    ids = [[1, 2], [3, 4, 5, 6], [7], [8, 9, 10]]
    seen = []
    for b in batches(ids, 3, pad=0):
        for r, i in enumerate(b.index.tolist()):
            n = len(ids[i])
            assert b.input_ids[r, :n].tolist() == ids[i]
            assert b.attention_mask[r].tolist() == [1] * n + [0] * (b.input_ids.shape[1] - n)
            assert int(b.last[r]) == n - 1
            seen.append(i)
    assert sorted(seen) == [0, 1, 2, 3]
    assert seen[0] == 1  # longest first


def test_subject_token_mask_uses_character_overlap() -> None:
    # "<s>" (0, 0), "The" (0, 3), " cap" (3, 7), "ital" (7, 11), " of" (11, 14), " Fr" (14, 17), "ance" (17, 21)
    offsets = [(0, 0), (0, 3), (3, 7), (7, 11), (11, 14), (14, 17), (17, 21)]
    assert subject_token_mask(offsets, 15, 21) == [False] * 5 + [True, True]
    assert subject_token_mask(offsets, 0, 3) == [False, True] + [False] * 5


# -- nonce subjects ---------------------------------------------------------------------------------


def test_nonce_facts_fill_train_templates_with_names_the_relation_has_no_answer_for() -> None:
    from recallfix.analysis.data.facts import Fact
    from recallfix.analysis.data.nonce import nonce_facts

    facts = [Fact(f"The capital of {s} is", a, s, "capital", "train", "The capital of {} is")
             for s, a in [("France", "Paris"), ("Japan", "Tokyo"), ("Peru", "Lima")]]
    facts += [Fact(f"{s} has the symbol", a, s, "symbol", "train", "{} has the symbol")
              for s, a in [("gold", "Au"), ("iron", "Fe")]]
    facts.append(Fact("No template here", "x"))  # no template or subject: not used
    made = nonce_facts(facts, 6, seed=0)
    assert len(made) == 12 and made == nonce_facts(facts, 6, seed=0) and made != nonce_facts(facts, 6, seed=1)
    capital = [f for f in made if f.relation == "capital"]
    assert all(f.prompt == f"The capital of {f.subject} is" and f.answer == "" for f in capital)
    own = {"france", "japan", "peru", "paris", "tokyo", "lima"}
    assert not {f.subject.lower() for f in capital} & own
    borrowed = {f.subject for f in capital} & {"gold", "iron", "Au", "Fe", "x"}  # other relations' names
    invented = [f.subject for f in capital if f.subject not in borrowed]
    assert borrowed and len(invented) == 3 and all(s[0].isupper() for s in invented)  # relation's style
    symbol = [f for f in made if f.relation == "symbol"]
    assert {f.subject for f in symbol} & {"France", "Japan", "Peru", "Paris", "Tokyo", "Lima"}
    assert nonce_facts(facts, 0, seed=0) == []



# -- readout products ----------------------------------------------------------------------------------


def test_readout_product_through_openblas_threads_equals_torch() -> None:
    from recallfix.analysis.mechanism import gemm

    torch.manual_seed(0)
    x, w = torch.randn(301, 48), torch.randn(500, 48)
    assert gemm._workers() is not None  # NumPy's OpenBLAS is there: the threaded path is the one under test
    assert torch.allclose(gemm.matmul_t(x, w), x @ w.T, atol=1e-4)
    assert torch.allclose(gemm.matmul_t(x[:5], w), x[:5] @ w.T, atol=1e-4)  # few rows: torch's own path
    p = torch.randn(301, 500)
    assert torch.allclose(gemm.matmul_t(p, w.T), p @ w, atol=1e-3)  # a transposed (strided) operand
    assert gemm.matmul_t(x.double(), w).dtype == torch.float32


def test_readout_product_keeps_autograd() -> None:
    from recallfix.analysis.mechanism.gemm import matmul_t

    torch.manual_seed(0)
    w = torch.randn(300, 8)
    for rows in (128, 5):  # the OpenBLAS product with its own backward, and torch's
        x = torch.randn(rows, 8, requires_grad=True)
        upstream = torch.randn(rows, 300)
        (matmul_t(x, w) * upstream).sum().backward()
        assert torch.allclose(x.grad, upstream @ w, atol=1e-4)
    trained = torch.randn(300, 8, requires_grad=True)  # a weight that needs its gradient: torch's path
    (matmul_t(torch.randn(128, 8), trained) * upstream[:1]).sum().backward()
    assert trained.grad is not None and trained.grad.abs().sum() > 0
