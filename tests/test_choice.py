"""Which candidate becomes patch.json: decided on dev only, and "no patch" when none lowers the dev NLL beyond its
interval (`learn.methods.choose`)."""

from __future__ import annotations

from recallfix.analysis.learn.methods import NEAR_EQUAL_NATS, choose, file_names
from recallfix.analysis.schema import EstimateModel, MethodInfo


def candidate(name: str, nll: tuple[float, float, float], accuracy: tuple[float, float, float] = (0.0, -0.01, 0.01),
              merged: str | None = None) -> MethodInfo:
    return MethodInfo(name=name, file="", patch_id=name, dev_nll=2.0 + nll[0],
                      dev_nll_change=EstimateModel(value=nll[0], ci_low=nll[1], ci_high=nll[2]),
                      dev_accuracy_change=EstimateModel(value=accuracy[0], ci_low=accuracy[1], ci_high=accuracy[2]),
                      merged=merged, lora=None)


def test_no_candidate_beyond_its_interval_means_no_patch() -> None:
    methods = [candidate("gains", (-0.02, -0.05, 0.01)), candidate("suppress", (0.0, 0.0, 0.0)),
               candidate("intercept", (0.3, 0.2, 0.4))]
    chosen, why = choose(methods)
    assert chosen is None
    assert why.startswith("no patch") and "gains: dev NLL -0.0200 [-0.0500, +0.0100]" in why
    assert "suppress" in why and "intercept" in why
    assert "gains: dev NLL -0.0200 [-0.0500, +0.0100]: the interval reaches 0" in why
    assert "intercept: dev NLL +0.3000 [+0.2000, +0.4000]: higher, beyond its interval" in why
    assert set(file_names(methods, chosen).values()) == {"patch.gains.json", "patch.suppress.json",
                                                          "patch.intercept.json"}


def test_the_lowest_dev_nll_among_those_that_qualify() -> None:
    methods = [candidate("gains", (-0.30, -0.40, -0.20), accuracy=(-0.05, -0.08, -0.02)),  # accuracy falls
               candidate("suppress", (-0.10, -0.15, -0.05)), candidate("intercept", (-0.20, -0.45, 0.05))]
    chosen, why = choose(methods)
    assert chosen == "suppress", why
    assert file_names(methods, chosen)["suppress"] == "patch.json"


def test_near_equal_candidates_prefer_one_vllm_can_serve() -> None:
    best = candidate("intercept", (-0.200, -0.3, -0.1), merged="no bias switch")
    servable = candidate("gains", (-0.200 + NEAR_EQUAL_NATS / 2, -0.3, -0.1))
    assert choose([best, servable])[0] == "gains"
    far = candidate("gains", (-0.200 + 2 * NEAR_EQUAL_NATS, -0.3, -0.1))
    assert choose([best, far])[0] == "intercept"
