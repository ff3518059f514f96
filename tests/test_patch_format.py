"""The Patch format: validation, refusal with a clear message, exact and reversible application.

Gain edits and bias edits (schema_version 2): a bias edit in memory equals a hook that adds the same
vector to the MLP output, also on Llama, whose down projection has no bias until the patch adds one.
"""

from __future__ import annotations

import json
import math

import jsonschema
import pytest
import torch
from tiny import PROMPTS, build_model

from recallfix.patches import (
    Component,
    ComponentMap,
    FingerprintMismatchError,
    Patch,
    PatchError,
    UnsupportedModelError,
    apply_patch,
    make_patch,
)
from recallfix.patches.hooks import hooks
from recallfix.patches.patch import SCHEMA_PATH, json_schema


@pytest.fixture(scope="module")
def llama():
    return build_model("llama")


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def same_weights(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(p, saved[name]) for name, p in model.named_parameters())


def test_schema_file_is_current_and_validates_patches(llama) -> None:
    model, _ = llama
    assert json.loads(SCHEMA_PATH.read_text()) == json_schema(), "run write_json_schema() after editing Patch"
    patch = make_patch(model, {"L1H0": 0.5, "L1N7": 1.3})
    jsonschema.validate(json.loads(patch.model_dump_json()), json.loads(SCHEMA_PATH.read_text()))


def test_round_trip_through_file(llama, tmp_path) -> None:
    model, _ = llama
    patch = make_patch(model, {"L1H2": 0.25, "L0MLP": 1.1}, command="test")
    path = patch.save(tmp_path / "p.json")
    loaded = Patch.load(path)
    assert loaded == patch and loaded.id == patch.id
    assert not list(tmp_path.glob(".*tmp")), "atomic write left a temp file"


def test_unit_gains_are_a_bit_for_bit_no_op(llama) -> None:
    model, _ = llama
    saved = weights(model)
    with apply_patch(model, make_patch(model, {"L1H0": 1.0, "L1N3": 1.0, "L0MLP": 1.0})):
        assert same_weights(model, saved)


def test_apply_changes_only_the_edited_slices_and_reverts_exactly(llama) -> None:
    model, tokenizer = llama
    cmap = ComponentMap(model)
    saved = weights(model)
    batch = tokenizer(PROMPTS[0], return_tensors="pt")
    with torch.no_grad():
        before = model(**batch).logits
    applied = apply_patch(model, make_patch(model, {"L1H1": 0.5}))
    o_proj = "model.layers.1.self_attn.o_proj.weight"
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, saved[n])}
    assert changed == {o_proj}
    d = cmap.shape.head_dim
    diff = (dict(model.named_parameters())[o_proj] != saved[o_proj]).any(dim=0)
    assert diff[d : 2 * d].all() and not diff[:d].any() and not diff[2 * d :].any()
    applied.revert()
    assert same_weights(model, saved)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, before)


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d.update(schema_version=3), "schema_version 3 is not supported (this recallfix reads 1, 2)"),
        (lambda d: d["edits"][0].update(gain=math.nan), "edits.0.gain"),
        (lambda d: d["edits"][0].update(gain=math.inf), "edits.0.gain"),
        (lambda d: d["edits"][0].update(component="L1Q3"), "edits.0.component"),
        (lambda d: d["edits"].append(dict(d["edits"][0])), "is edited twice"),
        (lambda d: d["edits"].append({"component": "L1MLP", "gain": 2.0}), "both scale layer 1"),
        (lambda d: d.update(edits=[]), "edits"),
        (lambda d: d["model"].pop("hidden_size"), "model.hidden_size"),
        (lambda d: d["edits"].append({"component": "L0MLP", "bias": [0.0] * 128}),
         "edits.1.bias: bias edits need schema_version 2"),
        (lambda d: d.update(schema_version=2, edits=[{"component": "L0MLP", "bias": [0.0, math.nan]}]),
         "edits.0.bias: bias must hold finite numbers, got nan at index 1"),
        (lambda d: d.update(schema_version=2, edits=[{"component": "L0H1", "bias": [0.0]}]), "edits.0.component"),
        (lambda d: d.update(schema_version=2, edits=[{"component": "L0MLP", "bias": [1.0], "gain": 1.0}]),
         "edits.0.gain: Extra inputs are not permitted"),
        (lambda d: d.update(schema_version=2, edits=[{"component": "L0MLP", "bias": []}]), "edits.0.bias"),
        (lambda d: d.update(schema_version=2, edits=[{"component": "L0MLP", "gain": 0.5},
                                                     {"component": "L0MLP", "bias": [1.0]}]), "L0MLP is edited twice"),
    ],
)
def test_invalid_documents_are_refused_naming_the_field(llama, tmp_path, mutate, field) -> None:
    model, _ = llama
    doc = json.loads(make_patch(model, {"L1N7": 1.5}).model_dump_json())
    mutate(doc)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc, allow_nan=True))
    with pytest.raises(PatchError) as err:
        Patch.load(path)
    assert str(path) in str(err.value) and field in str(err.value)


def test_unreadable_file_names_the_file(tmp_path) -> None:
    with pytest.raises(PatchError, match="missing.json"):
        Patch.load(tmp_path / "missing.json")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(PatchError, match="junk.json"):
        Patch.load(tmp_path / "junk.json")


def test_fingerprint_mismatch_is_refused_and_changes_nothing(llama) -> None:
    model, _ = llama
    patch = make_patch(model, {"L1H0": 0.5, "L1N7": 1.3})
    other, _ = build_model("llama", seed=1)  # same shape, other weights
    saved = weights(other)
    with pytest.raises(FingerprintMismatchError, match=r"model\.tensors\['model\.layers\.1\.mlp\.down_proj"):
        apply_patch(other, patch)
    assert same_weights(other, saved)

    qwen, _ = build_model("qwen2")
    with pytest.raises(FingerprintMismatchError, match="model.architecture: the patch was made for 'llama'"):
        apply_patch(qwen, patch)


def test_shape_field_mismatch_names_the_field(llama) -> None:
    model, _ = llama
    patch = make_patch(model, {"L1H0": 0.5})
    patch.model.num_kv_heads = 4
    expected = "model.num_kv_heads: the patch was made for 4, this model has 2"
    with pytest.raises(FingerprintMismatchError, match=expected):
        apply_patch(model, patch)


def test_double_application_is_refused(llama) -> None:
    model, _ = llama
    patch = make_patch(model, {"L0H3": 1.5})
    with apply_patch(model, patch), pytest.raises(FingerprintMismatchError, match="already patched"):
        apply_patch(model, patch)


@pytest.mark.parametrize(("component", "message"), [
    ("L5H0", "layer 5 does not exist"),
    ("L1H9", "head 9 does not exist"),
    ("L1N4096", "neuron 4096 does not exist"),
    ("layer1", "is not of the form"),
])
def test_unknown_components_are_refused(llama, component, message) -> None:
    model, _ = llama
    with pytest.raises(ValueError, match=message):
        make_patch(model, {component: 0.5})
    patch = make_patch(model, {"L1H0": 0.5})
    patch.edits[0].component = component
    saved = weights(model)
    with pytest.raises(PatchError, match=message):
        apply_patch(model, patch)
    assert same_weights(model, saved)


def test_unsupported_architecture_names_the_supported_ones() -> None:
    import transformers

    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64)
    with pytest.raises(UnsupportedModelError,
                       match="'bert' is not supported; supported: gemma3_text, gpt2, gpt_neox, llama"):
        ComponentMap.from_config(config)


# -- bias edits --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2():
    return build_model("gpt2")


def bias_vector(model: torch.nn.Module, seed: int = 3) -> torch.Tensor:
    return torch.randn(ComponentMap(model).shape.hidden_size, generator=torch.Generator().manual_seed(seed))


def test_gain_only_patches_stay_schema_version_1_and_bias_patches_are_2(llama) -> None:
    model, _ = llama
    gains_only = make_patch(model, {"L1H0": 0.5})
    assert gains_only.schema_version == 1, "older recallfix must still read a gain-only patch"
    with_bias = make_patch(model, {"L1H0": 0.5}, biases={"L1MLP": bias_vector(model)})
    assert with_bias.schema_version == 2
    assert with_bias.id != gains_only.id
    doc = json.loads(with_bias.model_dump_json())
    jsonschema.validate(doc, json.loads(SCHEMA_PATH.read_text()))
    assert doc["edits"][1] == {"component": "L1MLP", "bias": bias_vector(model).tolist()}


def test_a_version_1_document_is_still_read(llama, tmp_path) -> None:
    model, _ = llama
    patch = make_patch(model, {"L1N7": 1.5})
    doc = json.loads(patch.model_dump_json())
    assert doc["schema_version"] == 1 and "bias" not in json.dumps(doc["edits"])
    path = tmp_path / "v1.json"
    path.write_text(json.dumps(doc))
    loaded = Patch.load(path)
    assert loaded.gains == patch.gains and loaded.biases == {} and loaded.id == patch.id


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bias_edit_in_memory_equals_a_hook_on_the_mlp_output_and_reverts_exactly(arch, llama, gpt2) -> None:
    model, tokenizer = llama if arch == "llama" else gpt2
    cmap = ComponentMap(model)
    b = bias_vector(model)
    batch = tokenizer(PROMPTS[0], return_tensors="pt")
    saved, names = weights(model), [n for n, _ in model.named_parameters()]
    with torch.no_grad():
        base = model(**batch).logits
        with hooks(cmap, {"blocks.1.hook_mlp_out": lambda out: out - b}):
            hooked = model(**batch).logits
        with apply_patch(model, make_patch(model, {}, biases={"L1MLP": -b})):
            patched = model(**batch).logits
            down_bias = dict(model.named_parameters())[f"{cmap.module_name(Component(1, 'mlp'))}.bias"]
            if arch == "llama":  # the patch added the bias the projection lacked
                assert torch.equal(down_bias, -b)
    assert (hooked - base).abs().max() > 1e-2, "the bias should move the logits"
    assert (patched - hooked).abs().max() <= 1e-5
    assert [n for n, _ in model.named_parameters()] == names, "revert removes an added bias"
    assert same_weights(model, saved)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, base)


def test_bias_and_neuron_gains_on_one_layer_commute(llama) -> None:
    model, tokenizer = llama
    cmap = ComponentMap(model)
    b = bias_vector(model)
    batch = tokenizer(PROMPTS[1], return_tensors="pt")
    with torch.no_grad():
        with apply_patch(model, make_patch(model, {"L1N3": 2.0, "L1H2": 0.5}, biases={"L1MLP": b})):
            both = model(**batch).logits
        with apply_patch(model, make_patch(model, {"L1N3": 2.0, "L1H2": 0.5})), \
                hooks(cmap, {"blocks.1.hook_mlp_out": lambda out: out + b}):
            gains_then_hook = model(**batch).logits
    assert (both - gains_then_hook).abs().max() <= 1e-5


def test_bias_edit_fingerprints_the_projection_it_changes(llama, gpt2) -> None:
    llama_model, gpt2_model = llama[0], gpt2[0]
    patch = make_patch(llama_model, {}, biases={"L1MLP": bias_vector(llama_model)})
    assert sorted(patch.model.tensors) == ["model.layers.1.mlp.down_proj.weight"]  # no bias to hash yet
    patch = make_patch(gpt2_model, {}, biases={"L1MLP": bias_vector(gpt2_model)})
    assert sorted(patch.model.tensors) == ["transformer.h.1.mlp.c_proj.bias", "transformer.h.1.mlp.c_proj.weight"]

    other, _ = build_model("llama", seed=1)
    with pytest.raises(FingerprintMismatchError, match="down_proj.weight'\\]: sha256 differs"):
        apply_patch(other, make_patch(llama_model, {}, biases={"L0MLP": bias_vector(llama_model)}))


@pytest.mark.parametrize(("arch", "message"), [
    ("llama", "this model has model.layers.1.mlp.down_proj.bias, which the patch would add"),
    ("gpt2", "already patched"),
])
def test_double_application_of_a_bias_is_refused(arch, message, llama, gpt2) -> None:
    model, _ = llama if arch == "llama" else gpt2
    patch = make_patch(model, {}, biases={"L1MLP": bias_vector(model)})
    with apply_patch(model, patch), pytest.raises(FingerprintMismatchError, match=message):
        apply_patch(model, patch)


def test_bias_of_the_wrong_length_is_refused_naming_the_field(llama) -> None:
    model, _ = llama
    with pytest.raises(ValueError, match="edits.0.bias: 5 values, but the model's hidden_size is 128"):
        make_patch(model, {}, biases={"L1MLP": [0.1] * 5})
    patch = make_patch(model, {}, biases={"L1MLP": bias_vector(model)})
    patch.edits[0].bias = [0.1] * 5
    saved = weights(model)
    with pytest.raises(PatchError, match="edits.0.bias: 5 values, but the model's hidden_size is 128"):
        apply_patch(model, patch)
    assert same_weights(model, saved)


def test_a_non_finite_bias_in_the_serving_dtype_is_refused(llama) -> None:
    from recallfix.patches import check_patch_against

    model, _ = llama
    patch = make_patch(model, {}, biases={"L1MLP": torch.full((128,), 1e5)})  # above float16.max
    with pytest.raises(PatchError, match="down_proj.bias non-finite in float16"):
        check_patch_against(model, patch, dtype=torch.float16)
