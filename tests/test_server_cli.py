"""`recallfix serve`'s command line: vLLM's own options, offered and checked by vLLM's own parser before
anything starts, and carried unchanged to the vLLM servers it runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from server_fixtures import ROOT, SMALL_KV, calibration_file, patch_file, smollm2_dir

from recallfix.patches import Patch
from recallfix.server.cli import CPU_LORA_REASON, make_plan
from recallfix.server.config import ServeConfig
from recallfix.server.vllm_args import engine_args, parse, upstream_command, vllm_parser

pytestmark = pytest.mark.real_model  # SmolLM2-135M's checkpoint and patches, refused or planned before any start


def recallfix(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "recallfix.server", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_serve_help_shows_vllms_options() -> None:
    done = recallfix("serve", "--help")
    assert done.returncode == 0, done.stderr
    for option in ("--patch-mode", "--ab-split", "--tensor-parallel-size", "--pipeline-parallel-size",
                   "--data-parallel-size", "--quantization", "--max-num-seqs", "--kv-cache-dtype",
                   "--tool-call-parser", "--enable-prefix-caching"):
        assert option in done.stdout, option


def test_a_bad_vllm_option_fails_at_once_with_vllms_message() -> None:
    done = recallfix("serve", str(smollm2_dir()), "--tensor-paralel-size", "2")
    assert done.returncode == 2
    assert "unrecognized arguments: --tensor-paralel-size" in done.stderr
    assert "started vLLM" not in done.stderr  # nothing started
    bad_value = recallfix("serve", str(smollm2_dir()), "--dtype", "float33")
    assert bad_value.returncode == 2 and "float33" in bad_value.stderr and "invalid choice" in bad_value.stderr


def test_a_patch_for_another_model_fails_before_anything_starts(tiny_dirs) -> None:  # noqa: ANN001
    done = recallfix("serve", str(tiny_dirs["llama"]), "--patch", str(patch_file("learned")))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("recallfix: error: --patch")
    assert "Traceback" not in done.stderr and "started vLLM" not in done.stderr


def test_a_calibration_file_of_another_model_or_patch_fails_before_anything_starts(tmp_path) -> None:  # noqa: ANN001
    """--calibration is checked against the model and the served patch before any vLLM starts."""
    good = calibration_file()
    other = recallfix("serve", str(smollm2_dir()), "--patch", str(patch_file("other")), "--calibration", str(good),
                      "--cache-dir", str(tmp_path), *SMALL_KV)
    assert other.returncode == 2, other.stderr
    assert other.stderr.strip().splitlines()[-1].startswith(
        f"recallfix: error: --calibration {good}: the calibration file has no calibrator for patch "
        f"{Patch.load(patch_file('other')).id}; it has: base (base model), gains")
    doc = json.loads(good.read_text())
    tensor = next(iter(doc["model"]["tensors"]))
    doc["model"]["tensors"][tensor] = doc["model"]["tensors"][tensor][::-1]
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps(doc))
    refused = recallfix("serve", str(smollm2_dir()), "--calibration", str(foreign), *SMALL_KV)
    assert refused.returncode == 2 and "sha256 differs; the calibration file was fitted on another checkpoint" in \
        refused.stderr.strip().splitlines()[-1]
    alone = recallfix("serve", str(smollm2_dir()), "--abstain-below", "0.5", *SMALL_KV)
    assert alone.returncode == 2 and alone.stderr.strip().splitlines()[-1] == (
        "recallfix: error: --abstain-below needs --calibration: it abstains on the calibrated confidence")
    for done in (other, refused, alone):
        assert "Traceback" not in done.stderr and "started vLLM" not in done.stderr


def test_lora_mode_refuses_a_bias_patch_before_anything_starts(tmp_path) -> None:  # noqa: ANN001
    bias = patch_file("bias")
    done = recallfix("serve", str(smollm2_dir()), "--patch", str(bias), "--patch-mode", "lora", "--cache-dir",
                     str(tmp_path))
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"recallfix: error: --patch {bias}: --patch-mode lora cannot serve it: L29MLP adds a bias to the MLP output, "
        "and LoRA cannot carry bias changes; use --patch-mode merged")
    assert "Traceback" not in done.stderr and "started vLLM" not in done.stderr
    assert not any(tmp_path.iterdir()), "nothing was to be exported"


def test_auto_mode_says_why_it_serves_merged(tmp_path) -> None:  # noqa: ANN001
    """auto: merged where LoRA cannot carry the patch (the reason named), else by the platform (CPU here). The KV
    cache is stated (SMALL_KV) so that the plan does not depend on the memory other tests' servers leave free."""
    model = smollm2_dir()
    for name, reason in (("bias", "LoRA cannot serve this patch: L29MLP adds a bias to the MLP output"),
                         ("learned", CPU_LORA_REASON)):
        config = ServeConfig(patch=patch_file(name), patch_mode="auto", cache_dir=tmp_path)
        plan = make_plan(model, "smol", SMALL_KV, parse(model, SMALL_KV), config, Patch.load(patch_file(name)))
        assert plan.mode == "merged" and plan.reason.startswith(reason), plan.reason


def test_parallelism_reaches_vllms_engine_arguments() -> None:
    """It cannot run on one CPU; what vLLM's engine would be built from is read back from the command line
    `recallfix serve` gives each vLLM server."""
    model = smollm2_dir()
    argv = ["--tensor-parallel-size", "2", "--pipeline-parallel-size", "2", "--max-num-seqs", "7"]
    parsed = parse(model, argv)
    command = upstream_command(model, argv, port=1234, api_key="k", served_name="smol")
    module_args = command[command.index("-m") + 2:]
    from_command = vllm_parser().parse_args(module_args)
    for args in (parsed, from_command):
        engine = engine_args(args)
        assert (engine.tensor_parallel_size, engine.pipeline_parallel_size, engine.max_num_seqs) == (2, 2, 7)
        assert engine.model == str(model)
    assert from_command.host == "127.0.0.1" and from_command.api_key == ["k"] and from_command.port == 1234
    assert ServeConfig().patch_mode == "auto"


def test_lora_mode_on_cpu_warns_that_vllm_mixes_the_adapter_into_base_requests(tmp_path, caplog) -> None:  # noqa: ANN001
    model = smollm2_dir()
    config = ServeConfig(patch=patch_file("learned"), patch_mode="lora", cache_dir=tmp_path)
    with caplog.at_level("WARNING", logger="recallfix.server.cli"):
        plan = make_plan(model, "smol", SMALL_KV, parse(model, SMALL_KV), config, Patch.load(patch_file("learned")))
    from recallfix.server import vllm_args

    assert plan.mode == "lora"
    warned = any("--patch-mode merged serves the variants apart" in r.getMessage() for r in caplog.records)
    assert warned == vllm_args.on_cpu()
