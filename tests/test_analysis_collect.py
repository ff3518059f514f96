"""The final block's parts kept by `collect` for the intercept fix, against hooks on the real forward pass."""

from __future__ import annotations

import pytest
import torch
from tiny import ARCHITECTURES, PROMPTS, build_model

from recallfix.analysis.data.batching import batches, encode, pad_id
from recallfix.analysis.learn import fit as fit_module
from recallfix.analysis.learn.gains import fact_inputs
from recallfix.analysis.learn.replay import capture_final_block_inputs, replay_logits
from recallfix.analysis.mechanism.collect import collect
from recallfix.patches import ComponentMap

ANSWERS = [" Paris", " Au", " Portuguese"]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_final_block_parts_add_up_and_match_the_forward_pass(arch: str) -> None:
    model, tokenizer = build_model(arch)
    cmap = ComponentMap(model)
    final = cmap.shape.num_layers - 1
    answers = torch.tensor([tokenizer(a, add_special_tokens=False)["input_ids"][0] for a in ANSWERS])
    ids = encode(tokenizer, PROMPTS)
    c = collect(model, cmap, ids, answers, pad=pad_id(tokenizer), batch_size=2)
    n, h, d = len(PROMPTS), cmap.shape.num_heads, cmap.shape.hidden_size
    assert c.final_head_writes.shape == (n, h, d) and c.final_resid_mid.shape == c.final_mlp_out.shape == (n, d)
    # the stream after attention plus the MLP's write is what enters the final norm
    assert torch.allclose(c.final_resid_mid + c.final_mlp_out, c.x_final, atol=1e-4)
    seen: dict[str, torch.Tensor] = {}
    # What the block adds to the stream: the projection's output, or the norm's after it (Gemma 3's sandwich norms)
    attn_write = cmap.post_attn_norm(final) or cmap.attn_out(final)
    mlp_write = cmap.post_mlp_norm(final) or cmap.mlp_out(final)
    handles = [
        cmap.block(final).register_forward_pre_hook(
            lambda _m, args, kwargs: seen.__setitem__("x_in", args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True),
        attn_write.register_forward_hook(lambda _m, _a, out: seen.__setitem__("attn", out)),
        cmap.attn_out(final).register_forward_hook(lambda _m, _a, out: seen.__setitem__("attn_proj", out)),
        cmap.attn_out(final).register_forward_pre_hook(lambda _m, args: seen.__setitem__("z", args[0])),
        mlp_write.register_forward_hook(lambda _m, _a, out: seen.__setitem__("mlp", out)),
    ]
    runs = []
    try:
        for prompt in PROMPTS:  # one prompt at a time, no padding: hooks on the real modules
            with torch.no_grad():
                model(**tokenizer(prompt, return_tensors="pt"))
            runs.append(dict(seen))
    finally:
        for handle in handles:
            handle.remove()
    for i, run in enumerate(runs):
        last = len(ids[i]) - 1
        mid = run["x_in"][0, last] + run["attn"].reshape(len(ids[i]), -1)[last]
        assert torch.allclose(c.final_resid_mid[i], mid.float(), atol=1e-4)
        assert torch.allclose(c.final_mlp_out[i], run["mlp"].reshape(len(ids[i]), -1)[last].float(), atol=1e-4)
        # head k's write: its slice of z through its columns of the output projection (and through the norm after
        # it, its scale frozen at the projection's output: sqrt(mean(a^2) + eps), with its gain 1 + weight)
        z = run["z"].reshape(len(ids[i]), -1)[last].float().view(h, -1)
        w_o = cmap.output_weight(cmap.attn_out(final)).float().view(d, h, -1)
        expected = torch.einsum("hk,mhk->hm", z, w_o)
        if (norm := cmap.post_attn_norm(final)) is not None:
            a = run["attn_proj"].reshape(len(ids[i]), -1)[last].float()
            expected = expected / torch.sqrt(a.pow(2).mean() + norm.eps) * (1 + norm.weight.float())
            assert torch.allclose(expected.sum(0), run["attn"].reshape(len(ids[i]), -1)[last].float(), atol=1e-4)
        assert torch.allclose(c.final_head_writes[i], expected, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_fit_inputs_from_the_analysis_pass_equal_a_forward_pass_into_the_final_block(arch: str) -> None:
    """The fit replays train/dev facts from what `collect` kept, without a second forward pass: the same block
    inputs as a pass that stops inside the final block, and the replay gives the model's own logits."""
    model, tokenizer = build_model(arch)
    cmap = ComponentMap(model)
    answers = torch.tensor([5, 6, 7])  # distinct, so that each row's target names its prompt
    ids = encode(tokenizer, PROMPTS)
    c = collect(model, cmap, ids, answers, pad=pad_id(tokenizer), batch_size=2)
    rows = torch.tensor([2, 0, 1])
    recalled = torch.tensor([True, False, True])
    parts = fact_inputs(c, ids, rows, answers, recalled, 2, torch.device("cpu"))
    assert sum(len(p) for p in parts) == 3 and [len(p) for p in parts] == [2, 1]
    for part in parts:
        order = [int(torch.nonzero(answers == t)[0, 0]) for t in part.targets]
        batch = next(batches([ids[i] for i in order], 8, pad_id(tokenizer)))
        captured = capture_final_block_inputs(model, cmap, batch)  # rows in the batch's order
        assert torch.allclose(part.x[batch.index], captured.x, atol=1e-5)
        assert torch.allclose(part.z[batch.index], captured.z, atol=1e-5)
        assert torch.equal(part.recalled, recalled[order])  # recalled is indexed by prompt, as answers
        with torch.no_grad():
            logits = replay_logits(cmap, part)
        assert torch.allclose(logits.log_softmax(-1).gather(1, part.targets[:, None])[:, 0].exp(),
                              c.output.p_answer[order], atol=1e-5)


def test_step_samples_are_drawn_without_replacement_and_reproducibly() -> None:
    draw = fit_module.sample_rows(1000, 64, torch.Generator().manual_seed(0))
    again = fit_module.sample_rows(1000, 64, torch.Generator().manual_seed(0))
    assert len(draw) == 64 == len(set(draw.tolist())) and torch.equal(draw, again)
    assert int(draw.min()) >= 0 and int(draw.max()) < 1000
    assert torch.equal(fit_module.sample_rows(50, 64, torch.Generator()), torch.arange(50))  # fewer: all
    assert torch.equal(fit_module.sample_rows(50, 0, torch.Generator()), torch.arange(50))  # 0: all


def test_outputs_only_keeps_what_an_evaluation_reads() -> None:
    model, tokenizer = build_model("llama")
    cmap = ComponentMap(model)
    ids, answers = encode(tokenizer, PROMPTS), torch.tensor([5, 6, 7])
    full = collect(model, cmap, ids, answers, pad=pad_id(tokenizer), batch_size=2)
    light = collect(model, cmap, ids, answers, pad=pad_id(tokenizer), batch_size=2, outputs_only=True)
    for name in ("p_answer", "confidence", "nll", "brier", "rank", "prediction"):
        assert torch.equal(getattr(light.output, name), getattr(full.output, name))
        assert torch.equal(getattr(light.before, name), getattr(full.before, name))
    assert torch.equal(light.x_final, full.x_final) and torch.equal(light.final_z, full.final_z)
    assert light.final_effect.shape[1] == 0 and not light.lens_p.any()  # the costly readouts are skipped


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_heads_read_through_their_z_give_the_full_ablation_effect(arch: str) -> None:
    """The final layer's ablation effects with the heads' logits read from z (`head_readout`) equal the
    reference: a full readout of x_out minus each write through the real final norm."""
    from recallfix.analysis.mechanism.attribution import ablation_effect, ablation_effect_heads, head_readout
    from recallfix.patches import decompose

    model, tokenizer = build_model(arch)
    cmap = ComponentMap(model)
    final = cmap.shape.num_layers - 1
    batch = next(batches(encode(tokenizer, PROMPTS), 8, pad_id(tokenizer)))
    answers = torch.tensor([tokenizer(a, add_special_tokens=False)["input_ids"][0] for a in ANSWERS])[batch.index]
    dec = decompose(model, batch.input_ids, batch.attention_mask, cmap)
    names = dec.written_by(final)
    assert any(n.startswith(f"L{final}H") for n in names) and f"L{final}MLP" in names
    writes = torch.stack([dec.resid[:, dec.index(n)] for n in names], dim=1)
    reference = ablation_effect(cmap, dec.final_resid, writes, answers)
    fast = ablation_effect_heads(cmap, dec.final_resid, writes, names, final, dec.z[final],
                                 head_readout(cmap, final), answers, dec.attn_scale.get(final))
    assert fast.shape == reference.shape and reference.abs().max() > 1e-4
    assert torch.allclose(fast, reference, atol=1e-4, rtol=1e-3)
