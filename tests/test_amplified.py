"""What an amplified component does to the answer (`evaluate.amplified`): the three paths' logit changes add up to
the real change, each path is what it claims to be, and a gain of 1 changes nothing."""

from __future__ import annotations

import pytest
import torch
from tiny import ARCHITECTURES, PROMPTS, build_model

from recallfix.analysis.data.batching import batches, encode
from recallfix.analysis.evaluate.amplified import PATHS, path_effects
from recallfix.analysis.learn.gain_hooks import GainHooks
from recallfix.analysis.learn.replay import capture_final_block_inputs, replay_logits
from recallfix.patches import ComponentMap


def final_inputs(arch: str):  # noqa: ANN201
    model, tokenizer = build_model(arch)
    cmap = ComponentMap(model)
    batch = next(batches(encode(tokenizer, PROMPTS), len(PROMPTS), tokenizer.pad_token_id, torch.device("cpu")))
    inputs = capture_final_block_inputs(model, cmap, batch)
    inputs.targets = torch.tensor([5, 17, 40])  # any tokens: the identities hold for every answer
    return model, cmap, inputs


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_paths_add_up_to_the_real_change_of_the_answer_logit(arch: str) -> None:
    _, cmap, inputs = final_inputs(arch)
    final = cmap.shape.num_layers - 1
    for name in (f"L{final}H1", f"L{final}MLP"):
        effects = path_effects(cmap, inputs, name, 1.7)
        base = replay_logits(cmap, inputs)
        hooked = GainHooks(cmap, [name])
        hooked.set({name: 1.7})
        with hooked, torch.no_grad():
            gained = replay_logits(cmap, inputs)
        rows = torch.arange(len(inputs))
        real = gained[rows, inputs.targets] - base[rows, inputs.targets]
        summed = sum(effects[f"{p}_logit"] for p in PATHS)
        assert torch.allclose(summed, real, atol=1e-4), (name, summed, real)
        logp = gained.log_softmax(-1)[rows, inputs.targets] - base.log_softmax(-1)[rows, inputs.targets]
        assert torch.allclose(effects["total"], logp, atol=1e-5)
        # no path through the MLP for the MLP's own gain, nor where attention and MLP run in parallel (GPT-NeoX)
        if name.endswith("MLP") or arch == "gpt_neox":
            assert effects["mlp_logit"].abs().max() == 0
        else:  # the final MLP reads the stream the head wrote to
            assert effects["mlp_logit"].abs().max() > 1e-6
        if arch == "gemma3_text" and name.endswith("MLP"):
            # the norm after Gemma 3's MLP divides out a scale of the MLP's whole output: no effect at all
            assert effects["total"].abs().max() < 1e-5
        else:
            assert effects["direct_logit"].abs().max() > 1e-4  # the component's own write moves the answer


def test_a_gain_of_one_changes_nothing() -> None:
    _, cmap, inputs = final_inputs("llama")
    effects = path_effects(cmap, inputs, "L1H0", 1.0)
    for key, values in effects.items():
        assert values.abs().max() < 1e-5, key


def test_the_rescale_path_is_the_norms_new_scale() -> None:
    """Scaling the whole stream's write up (a large gain) changes the final RMS: the rescale path is what
    remains after the two linear paths, and with the norm's scale frozen there would be none."""
    _, cmap, inputs = final_inputs("llama")
    effects = path_effects(cmap, inputs, "L1MLP", 5.0)
    assert effects["rescale_logit"].abs().max() > 1e-3


def test_a_gain_on_a_normalised_mlp_is_left_out_of_the_fit() -> None:
    """Where a norm follows the MLP (Gemma 3) its whole-MLP gain changes nothing (measured above), so the fit
    leaves it out and says why; elsewhere it stays."""
    from recallfix.analysis.pipeline import without_normalised_mlp

    gemma = ComponentMap(build_model("gemma3_text")[0])
    kept, why = without_normalised_mlp(gemma, ["L1H0", "L1MLP"])
    assert kept == ["L1H0"] and "L1MLP left out" in why
    llama = ComponentMap(build_model("llama")[0])
    assert without_normalised_mlp(llama, ["L1H0", "L1MLP"]) == (["L1H0", "L1MLP"], "")
