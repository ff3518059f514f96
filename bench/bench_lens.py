"""The final layer's decomposition at the last position: recallfix against TransformerLens, side by side.

Both compute, for every shipped fact, the direct logit attribution (DLA) of each final-layer head and each
final-layer MLP neuron to the fact's answer token, at the prompt's last real token: the write read out through
the final norm with its scale frozen at the real forward pass's value, against the mean logit over the
vocabulary (`recallfix.patches.decompose.direct_logit_attribution` / `neuron_attribution`). recallfix runs
`decompose` as `recallfix analyze` does; TransformerLens 4.x boots a `TransformerBridge` on the same local
checkpoint and runs `run_with_cache`, then `cache.logit_attrs` over `cache.stack_head_results` for the heads and
over `cache.get_neuron_results` for the neurons. Same prompts, same answer tokens, same batches.

Each side runs in a fresh process (peak RSS is its own), alternating, for several rounds; the report gives the
medians, their spread and the TransformerLens / recallfix ratios, checks that the attributions agree (exits 1
when they do not) and writes docs/benchmarks.md between the `bench_lens` markers.

TransformerLens is not a dependency of recallfix: it is installed on first use into its own venv
(.cache/bench-tl-venv), with the torch and transformers versions of this environment.

    python bench/bench_lens.py [--max-facts N] [--rounds 3] [--batch-size 32] [--threads N] [--no-write]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TL_VENV = ROOT / ".cache" / "bench-tl-venv"
TL_VERSION = "4.3.0"
MODEL = "smollm2-135m"
SIDES = ("recallfix", "transformer_lens")  # the two compared; FLOOR runs beside them as the reference
FLOOR = "forward"  # the model's own forward pass, nothing kept: what any method that runs the model must pay
# Goals of issue 11: TransformerLens / recallfix at least this much wall time, at least this much peak memory.
GOAL_TIME, GOAL_MEMORY = 3.0, 3.0
# Agreement. Both sides compute the same float32 quantity through different kernels and orders (TransformerLens
# folds the norm weight into W_U and centres it; its attention runs eagerly, recallfix's through sdpa), so the
# attributions differ by float32 rounding accumulated over 30 blocks: eager against sdpa attention moves
# recallfix's own head DLA by 1-2e-6 of its largest value. A difference of definition moves it by a large fraction
# (leaving out the mean-logit centring: 0.32-0.35 of the largest value). 1e-3 of the largest |attribution| sits
# between the two, about three orders of magnitude from each; the correlation must be 1 to six decimals.
MAX_ABS_REL, MIN_CORRELATION = 1e-3, 0.999999


def peak_rss_mib(field: str = "VmHWM") -> float:
    """This process's peak resident set (VmHWM; VmRSS: the current one). Not ru_maxrss: Linux carries the RSS of
    the parent that forked a child into the child's ru_maxrss across exec, which would give both sides the bench's
    own RSS as a floor."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def cpu_s() -> float:
    """User + system CPU time of this process, all threads: on a shared machine, less noisy than wall time."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def loaded_mark(model: object) -> dict:
    """Where the pass starts: the clock, CPU time, RSS of the loaded model, the peak so far (then reset to the
    current RSS, Linux clear_refs 5, so that the pass's own peak can be read). The weights are read once first:
    safetensors may be mapped lazily, and their pages would otherwise count as the pass's."""
    import torch

    with torch.no_grad():
        for param in model.parameters():  # type: ignore[attr-defined]
            param.sum()
    mark = {"at": time.perf_counter(), "cpu": cpu_s(), "rss": peak_rss_mib("VmRSS"), "peak": peak_rss_mib()}
    with contextlib.suppress(OSError):  # no reset: the pass's own peak reads as at least the load's
        Path("/proc/self/clear_refs").write_text("5")
    return mark


def timings(imports_rss_mib: float, start: float, mark: dict) -> dict:
    """A side's numbers once its pass is done: model load (start to the mark), the pass (since the mark)."""
    peak = peak_rss_mib()
    return {"load_s": mark["at"] - start, "pass_s": time.perf_counter() - mark["at"],
            "pass_cpu_s": cpu_s() - mark["cpu"], "imports_rss_mib": imports_rss_mib,
            "pass_rss_mib": peak - mark["rss"], "peak_rss_mib": max(peak, mark["peak"])}


# --- the two sides, each run in its own process -----------------------------------------------------------------


def side_recallfix(inputs: dict, batch_size: int) -> tuple[dict, dict]:
    """As `recallfix analyze` runs its pass (`analysis.collect`): decompose per batch, DLA of the final block."""
    import torch
    from transformers import AutoModelForCausalLM  # noqa: F401  imported before the clock, as on the other side

    from recallfix.analysis.data.batching import batches
    from recallfix.patches import ComponentMap, decompose, direct_logit_attribution, neuron_attribution
    from recallfix.patches.memory import keep_freed_memory
    from recallfix.patches.registry.load import load_model

    keep_freed_memory()  # the CLI does this at start
    imported, start = peak_rss_mib(), time.perf_counter()
    lm = load_model(inputs["model_dir"])
    cmap = ComponentMap(lm)
    mark = loaded_mark(lm)
    final, n = cmap.shape.num_layers - 1, len(inputs["token_ids"])
    answers = torch.tensor(inputs["answers"], dtype=torch.long)
    heads = torch.zeros(n, cmap.shape.num_heads)
    neurons = torch.zeros(n, cmap.shape.intermediate_size)
    with torch.no_grad():
        for batch in batches(inputs["token_ids"], batch_size, inputs["pad"]):
            dec = decompose(lm, batch.input_ids, batch.attention_mask, cmap)
            ids = answers[batch.index]
            columns = [dec.index(name) for name in cmap.heads(final)]
            heads[batch.index] = direct_logit_attribution(dec, cmap, ids)[:, columns]
            neurons[batch.index] = neuron_attribution(dec, cmap, final, ids)
    return timings(imported, start, mark), {"heads": heads, "neurons": neurons}


def side_forward(inputs: dict, batch_size: int) -> tuple[dict, dict]:
    """The floor: the same model, batches and attention as recallfix's side, the forward pass alone (logits at the
    last position only, nothing captured). No method that runs the model to attribute its final layer can take
    less time, so TransformerLens' time over this one bounds the speed-up any such method can show."""
    import torch
    from transformers import AutoModelForCausalLM  # noqa: F401  imported before the clock, as on the other sides

    from recallfix.analysis.data.batching import batches
    from recallfix.patches.memory import keep_freed_memory
    from recallfix.patches.registry.load import load_model

    keep_freed_memory()
    imported, start = peak_rss_mib(), time.perf_counter()
    lm = load_model(inputs["model_dir"])
    mark = loaded_mark(lm)
    last = torch.zeros(len(inputs["token_ids"]))
    with torch.no_grad():
        for batch in batches(inputs["token_ids"], batch_size, inputs["pad"]):
            logits = lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False,
                        logits_to_keep=batch.last.unique()).logits
            last[batch.index] = logits[:, -1].max(dim=-1).values.float()
    return timings(imported, start, mark), {"max_logit": last}


def side_transformer_lens(inputs: dict, batch_size: int) -> tuple[dict, dict]:
    """What a TransformerLens 4.x user writes: boot the bridge on the checkpoint, run_with_cache, logit_attrs.

    Compatibility mode folds the final norm's weight into W_U and centres W_U over the vocabulary (its
    documented set-up for direct logit attribution), so `logit_attrs` reads the answer's logit against the mean
    logit with the norm's cached scale: the quantity recallfix computes. Left padding with the attention mask
    puts every prompt's last token at position -1 (the bridge derives the position ids from the mask).
    """
    import einops
    import torch
    from transformer_lens.model_bridge import TransformerBridge

    imported, start = peak_rss_mib(), time.perf_counter()
    bridge = TransformerBridge.boot_transformers(inputs["model_dir"], device="cpu", dtype=torch.float32)
    bridge.enable_compatibility_mode(disable_warnings=True)
    mark = loaded_mark(bridge)
    cfg = bridge.cfg
    final, token_ids, n = cfg.n_layers - 1, inputs["token_ids"], len(inputs["token_ids"])
    answers = torch.tensor(inputs["answers"], dtype=torch.long)
    heads = torch.zeros(n, cfg.n_heads)
    neurons = torch.zeros(n, cfg.d_mlp)
    order = sorted(range(n), key=lambda i: (-len(token_ids[i]), i))  # the same batches as recallfix's
    with torch.no_grad():
        for at in range(0, n, batch_size):
            rows = order[at : at + batch_size]
            width = max(len(token_ids[i]) for i in rows)
            ids = torch.full((len(rows), width), inputs["pad"], dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                ids[r, width - len(token_ids[i]) :] = torch.tensor(token_ids[i])
                mask[r, width - len(token_ids[i]) :] = 1
            _, cache = bridge.run_with_cache(ids, attention_mask=mask)
            index = torch.tensor(rows)
            stack = cache.stack_head_results(layer=-1, pos_slice=-1)[-cfg.n_heads :]  # [heads, batch, d]
            heads[index] = cache.logit_attrs(stack, answers[index], pos_slice=-1).T
            writes = einops.rearrange(cache.get_neuron_results(final, pos_slice=-1), "b n d -> n b d")
            neurons[index] = cache.logit_attrs(writes, answers[index], pos_slice=-1).T
            del cache
    return timings(imported, start, mark), {"heads": heads, "neurons": neurons}


def child(side: str, inputs_path: str, out_path: str, batch_size: int, threads: int) -> None:
    """One side in this (fresh) process: attributions to out_path (safetensors), timings as JSON on stdout."""
    start = time.perf_counter()
    if threads:
        import torch

        torch.set_num_threads(threads)
    inputs = json.loads(Path(inputs_path).read_text())
    run = {"recallfix": side_recallfix, "transformer_lens": side_transformer_lens, FLOOR: side_forward}[side]
    times, tensors = run(inputs, batch_size)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, out_path)
    import torch
    import transformers

    times["peak_rss_mib"] = max(times["peak_rss_mib"], peak_rss_mib())
    print(json.dumps({**times, "in_process_s": time.perf_counter() - start,
                      "torch": torch.__version__, "transformers": transformers.__version__,
                      "threads": torch.get_num_threads()}))


# --- the parent: inputs, the TransformerLens venv, rounds, agreement, report --------------------------------------


def tl_python() -> Path:
    """TransformerLens' own venv (made on first use): this environment's torch and transformers, TransformerLens
    TL_VERSION. A stamp written last marks it complete; an interrupted install is redone."""
    import torch
    import transformers

    python, stamp = TL_VENV / "bin" / "python", TL_VENV / ".bench-lens-installed"
    wanted = [f"torch=={torch.__version__.split('+')[0]}", f"transformers=={transformers.__version__}",
              f"transformer-lens=={TL_VERSION}"]
    if stamp.exists() and stamp.read_text().split() == wanted:
        return python
    print(f"installing {' '.join(wanted)} into {TL_VENV}", flush=True)
    subprocess.run(["rm", "-rf", str(TL_VENV)], check=True)
    subprocess.run([sys.executable, "-m", "venv", str(TL_VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *wanted], check=True)
    stamp.write_text(" ".join(wanted) + "\n")
    return python


def prepare_inputs(max_facts: int | None, path: Path) -> dict:
    """The shipped facts' prompts and answer tokens, tokenised as `recallfix analyze` does (one file for both)."""
    from transformers import AutoTokenizer

    from recallfix.analysis.data.batching import pad_id
    from recallfix.analysis.data.facts import load_shipped_facts
    from recallfix.analysis.data.inputs import prepare, subsample
    from recallfix.patches.registry.models import resolve_model

    model_dir = resolve_model(MODEL)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = prepare(tokenizer, subsample(load_shipped_facts(), max_facts, seed=0), "shipped facts")
    inputs = {"model_dir": str(model_dir), "token_ids": prompts.token_ids, "answers": prompts.answers.tolist(),
              "pad": pad_id(tokenizer)}
    path.write_text(json.dumps(inputs))
    return inputs


def run_child(side: str, python: Path, inputs: Path, out: Path, batch_size: int, threads: int) -> dict:
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    if side == "transformer_lens":
        env.pop("PYTHONPATH", None)  # its venv alone
    command = [str(python), str(Path(__file__).resolve()), "--child", side, "--inputs", str(inputs),
               "--out", str(out), "--batch-size", str(batch_size), "--threads", str(threads)]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{side} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "process_s": wall, "load_before": load}


def agreement(a: dict, b: dict) -> dict:
    """Largest |difference| (absolute, and relative to the largest |attribution|) and Pearson correlation."""
    import torch

    out = {}
    for name in ("heads", "neurons"):
        x, y = a[name].double(), b[name].double()
        diff = (x - y).abs().max().item()
        scale = x.abs().max().item()
        corr = torch.corrcoef(torch.stack([x.flatten(), y.flatten()]))[0, 1].item()
        out[name] = {"max_abs_diff": diff, "max_abs": scale, "rel": diff / scale, "corr": corr,
                     "ok": diff <= MAX_ABS_REL * scale and corr >= MIN_CORRELATION, "shape": list(x.shape)}
    return out


ROWS = (("pass_s", "decomposition pass, wall (s)", 2), ("pass_cpu_s", "decomposition pass, CPU time (s)", 2),
        ("load_s", "model load (s)", 2),
        ("process_s", "whole process, interpreter to exit (s)", 2), ("peak_rss_mib", "peak RSS (MiB)", 0),
        ("imports_rss_mib", "of which: RSS after the imports, before the model (MiB)", 0),
        ("pass_rss_mib", "of which: peak above the RSS of the loaded model (the pass's own, MiB)", 0))


def ratio(runs: dict[str, list[dict]], key: str, over: str = "transformer_lens", under: str = "recallfix") -> float:
    return statistics.median(r[key] for r in runs[over]) / statistics.median(r[key] for r in runs[under])


def report(runs: dict[str, list[dict]], agree: dict, args: argparse.Namespace, n: int, command: str) -> str:
    from bench_doc import commit, machine, markers, spread  # bench/ is on sys.path: this runs as a script

    begin, end = markers("bench_lens")
    rf, tl = runs["recallfix"][0], runs["transformer_lens"][0]
    loads = [r["load_before"] for side in runs for r in runs[side]]
    scope = "all shipped facts" if args.max_facts is None else f"--max-facts {args.max_facts}"
    lines = [begin, "## Final-layer DLA: recallfix against TransformerLens (bench/bench_lens.py)", "",
             f"- machine: {machine()}; shared with other jobs: 1-minute load average before each run "
             f"{min(loads):.1f}-{max(loads):.1f} (median {statistics.median(loads):.1f})",
             f"- recallfix: torch {rf['torch']} ({rf['threads']} threads), transformers {rf['transformers']}; "
             f"TransformerLens {TL_VERSION} in its own venv: torch {tl['torch']} ({tl['threads']} threads), "
             f"transformers {tl['transformers']}",
             f"- code: {commit()}; model: {MODEL} (SmolLM2-135M-Instruct, float32, CPU)",
             f"- prompts: {n} ({scope}), batch size {args.batch_size}, {args.rounds} rounds, the sides "
             "in turn (each first in one round of three), each a fresh process",
             f"- command: `{command}`",
             "- forward pass alone: the model's own forward pass on recallfix's batches, logits at the last position "
             "only, nothing captured (the floor of any method that runs the model)", "",
             "| per run: median [min-max] | recallfix | TransformerLens | forward pass alone "
             "| TransformerLens / recallfix | recallfix / forward pass |",
             "|---|---:|---:|---:|---:|---:|"]
    for key, label, digits in ROWS:
        cells = " | ".join(spread([r[key] for r in runs[side]], digits) for side in ("recallfix",
                                                                                      "transformer_lens", FLOOR))
        lines.append(f"| {label} | {cells} | {ratio(runs, key):.2f} | {ratio(runs, key, 'recallfix', FLOOR):.2f} |")
    time_ratio, memory_ratio = ratio(runs, "pass_s"), ratio(runs, "peak_rss_mib")
    ceiling_time = ratio(runs, "pass_s", "transformer_lens", FLOOR)
    ceiling_memory = ratio(runs, "peak_rss_mib", "transformer_lens", FLOOR)
    lines += ["", "Goals (issue 11), on the medians:", "",
              f"- at least {GOAL_TIME:.0f}x faster (decomposition pass): {time_ratio:.2f}x, "
              f"**{'met' if time_ratio >= GOAL_TIME else 'not met'}** (CPU time: {ratio(runs, 'pass_cpu_s'):.2f}x; "
              f"whole process: {ratio(runs, 'process_s'):.2f}x)",
              f"- at most a third of the memory (peak RSS): TransformerLens / recallfix = {memory_ratio:.2f}, "
              f"**{'met' if memory_ratio >= GOAL_MEMORY else 'not met'}**",
              f"- the ceiling on this model: the forward pass alone is {ceiling_time:.2f}x faster than "
              f"TransformerLens' pass and peaks at 1/{ceiling_memory:.2f} of its memory; no method that runs the "
              "model's forward pass on every prompt can show more against TransformerLens", "",
              f"Agreement (tolerance: max |difference| <= {MAX_ABS_REL:g} x the largest |attribution|, "
              f"correlation >= {MIN_CORRELATION}):", "",
              "| attribution | shape | max \\|recallfix\\| | max \\|difference\\| | relative | correlation | |",
              "|---|---|---:|---:|---:|---:|---|"]
    for name, a in agree.items():
        lines.append(f"| final-layer {name} | {' x '.join(map(str, a['shape']))} | {a['max_abs']:.3f} | "
                     f"{a['max_abs_diff']:.2e} | {a['rel']:.1e} | {a['corr']:.9f} | "
                     f"{'within' if a['ok'] else 'OUTSIDE'} |")
    lines.append(end)
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-facts", type=int, default=None, help="a seeded subset of whole subjects (default all)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32, help="prompts per forward pass (analyze's default)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads in both sides (0: torch's default); 1 keeps the ratio steady when other "
                             "jobs share the cores")
    parser.add_argument("--no-write", action="store_true", help="print the section, leave docs/benchmarks.md")
    parser.add_argument("--child", choices=(*SIDES, FLOOR), help=argparse.SUPPRESS)
    parser.add_argument("--inputs", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.inputs, args.out, args.batch_size, args.threads)
        return
    from safetensors.torch import load_file

    pythons = {"recallfix": Path(sys.executable), "transformer_lens": tl_python(), FLOOR: Path(sys.executable)}
    order = (*SIDES, FLOOR)
    runs: dict[str, list[dict]] = {side: [] for side in order}
    with tempfile.TemporaryDirectory() as tmp:
        inputs_path = Path(tmp) / "inputs.json"
        n = len(prepare_inputs(args.max_facts, inputs_path)["token_ids"])
        for r in range(args.rounds):
            for side in order[r % 3:] + order[: r % 3]:  # each side first in one round of three
                out = Path(tmp) / f"{side}.safetensors"
                run = run_child(side, pythons[side], inputs_path, out, args.batch_size, args.threads)
                runs[side].append(run)
                print(f"round {r + 1} {side}: pass {run['pass_s']:.1f} s, process {run['process_s']:.1f} s, "
                      f"peak RSS {run['peak_rss_mib']:.0f} MiB", flush=True)
        agree = agreement(load_file(str(Path(tmp) / "recallfix.safetensors")),
                          load_file(str(Path(tmp) / "transformer_lens.safetensors")))
    command = "python bench/bench_lens.py" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items()
        if k in ("max_facts", "rounds", "batch_size", "threads") and v)
    section = report(runs, agree, args, n, command)
    if not args.no_write:
        from bench_doc import write_section

        write_section("bench_lens", section)
    print(section)
    if not all(a["ok"] for a in agree.values()):
        sys.exit("the attributions disagree beyond the tolerance")


if __name__ == "__main__":
    main()
