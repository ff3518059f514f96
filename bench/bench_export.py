"""Merged export: streaming shard-by-shard (recallfix) against the naive peer (load, patch, save_pretrained).

Each side runs in its own fresh process, so its peak RSS is its own. Reported as ratios, side by side,
on the same checkpoint: a random Llama-architecture model saved in several shards; the two outputs must hold the
same tensors (exits 1 otherwise). Writes docs/benchmarks.md between the `bench_export` markers.

    python bench/bench_export.py [--hidden 1024 --layers 12 --shard 100MB] [--repeats 3] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def rss_mb() -> float:
    """Resident memory, mmapped checkpoint pages included (safetensors maps files; they count while touched)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


class PeakSampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self.stopped = rss_mb(), threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.002):
            self.peak = max(self.peak, rss_mb())


def build(out: Path, hidden: int, layers: int, shard: str) -> Path:
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128,
                                      vocab_size=8192, tie_word_embeddings=False)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(out, max_shard_size=shard)
    return out


def make_patch_file(model_dir: Path, out: Path) -> Path:
    from recallfix.patches import make_patch
    from recallfix.patches.registry.load import load_model

    model = load_model(model_dir)
    last = model.config.num_hidden_layers - 1
    make_patch(model, {f"L{last}H0": 0.5, f"L{last}H3": 0.7, f"L{last}N11": 1.4}).save(out)
    return out


def side(kind: str, model_dir: Path, patch_file: Path, out: Path) -> dict:
    """One side of the comparison; runs in a child process."""
    import gc

    import transformers

    from recallfix.patches import Patch, apply_patch
    from recallfix.patches.export import export_merged
    from recallfix.patches.registry.load import load_model

    patch = Patch.load(patch_file)
    # Both sides pay for imports and config parsing before the baseline, so only the export is measured.
    transformers.AutoConfig.from_pretrained(model_dir)
    transformers.models.llama.modeling_llama.LlamaForCausalLM  # noqa: B018 (imports the module)

    gc.collect()
    baseline = rss_mb()  # after imports: count only the export's own memory
    sampler = PeakSampler()
    sampler.start()
    start = time.perf_counter()
    if kind == "streaming":
        export_merged(model_dir, patch, out)
    else:
        model = load_model(model_dir)
        apply_patch(model, patch)
        model.save_pretrained(out)
    seconds = time.perf_counter() - start
    sampler.stopped.set()
    sampler.join()
    return {"seconds": seconds, "peak_mb": sampler.peak - baseline}


def run_sides(model_dir: Path, patch_file: Path, tmp: Path, repeats: int) -> dict[str, list[dict]]:
    """Both sides `repeats` times, each in a fresh process, in turn (drift hits both alike). The first output of
    each is kept (`{kind}-0`, to compare them), the others removed (a real-size checkpoint fills a disk)."""
    runs: dict[str, list[dict]] = {"streaming": [], "naive": []}
    for i in range(repeats):
        for kind in list(runs) if i % 2 == 0 else list(runs)[::-1]:
            out = tmp / f"{kind}-{i}"
            child = subprocess.run([sys.executable, __file__, "--side", kind, "--args",
                                    json.dumps([str(model_dir), str(patch_file), str(out)])],
                                   capture_output=True, text=True, check=True)
            runs[kind].append(json.loads(child.stdout.strip().splitlines()[-1]))
            if i:
                shutil.rmtree(out)
            print(f"run {i + 1} {kind}: {runs[kind][-1]['peak_mb']:.0f} MiB, {runs[kind][-1]['seconds']:.1f} s",
                  flush=True)
    return runs


def same_tensors(a: Path, b: Path) -> tuple[bool, float]:
    """Whether two checkpoints hold the same tensors (names and values), and the largest |difference|."""
    from safetensors.torch import load_file

    def tensors(d: Path) -> dict:
        return {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(f).items()}

    x, y = tensors(a), tensors(b)
    if set(x) != set(y):
        return False, float("inf")
    worst = max((x[k].float() - y[k].float()).abs().max().item() for k in x)
    return worst == 0.0, worst


def report(runs: dict[str, list[dict]], checkpoint: str, equal: tuple[bool, float], command: str) -> str:
    import statistics

    import torch
    import transformers
    from bench_doc import commit, machine, markers, spread  # bench/ is on sys.path: this runs as a script

    begin, end = markers("bench_export")
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("seconds", "peak_mb")} for k, v in runs.items()}
    largest = runs["streaming"][0]["largest_shard_mb"]
    lines = [begin, "## Merged export: streaming against load-patch-save (bench/bench_export.py)", "",
             f"- machine: {machine(f'torch {torch.__version__}', f'transformers {transformers.__version__}')}",
             f"- code: {commit('patches', 'bench')}; checkpoint: {checkpoint}",
             f"- command: `{command}`",
             "- streaming: `recallfix export --format merged` (`patches.export.export_merged`, shard by shard); naive: "
             "`load_model`, `apply_patch`, `save_pretrained` (what a user would write); each side a fresh process, "
             "in turn; peak RSS is the export's own (sampled every 2 ms, above the RSS after the imports)", "",
             "| per run: median [min-max] | streaming | naive | streaming / naive |", "|---|---:|---:|---:|"]
    for key, label in (("peak_mb", "peak RSS (MiB)"), ("seconds", "wall (s)")):
        cells = [spread([r[key] for r in runs[k]], 1) for k in ("streaming", "naive")]
        lines.append(f"| {label} | {cells[0]} | {cells[1]} | {med['streaming'][key] / med['naive'][key]:.2f} |")
    lines += ["", f"- streaming peak RSS / largest shard ({largest:.0f} MiB): "
              f"{med['streaming']['peak_mb'] / largest:.2f}",
              f"- the two exports hold the same tensors, bit for bit: {'yes' if equal[0] else 'NO'} "
              f"(largest |difference| {equal[1]:g})", end]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--shard", default="100MB")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print the section, leave docs/benchmarks.md")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--args", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        model_dir, patch_file, out = map(Path, json.loads(args.args))
        print(json.dumps(side(args.side, model_dir, patch_file, out)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = build(tmp / "model", args.hidden, args.layers, args.shard)
        patch_file = make_patch_file(model_dir, tmp / "patch.json")
        shards = sorted(model_dir.glob("*.safetensors"))
        total_mb = sum(p.stat().st_size for p in shards) / 2**20
        largest_mb = max(p.stat().st_size for p in shards) / 2**20
        runs = run_sides(model_dir, patch_file, tmp, args.repeats)
        for run in runs["streaming"] + runs["naive"]:
            run["largest_shard_mb"] = largest_mb
        equal = same_tensors(tmp / "streaming-0", tmp / "naive-0")
    checkpoint = (f"random Llama (hidden {args.hidden}, {args.layers} layers, float32), {total_mb:.0f} MiB in "
                  f"{len(shards)} shards of at most {args.shard}, largest {largest_mb:.0f} MiB; patch: two final-layer "
                  "heads and a neuron")
    command = (f"python bench/bench_export.py --hidden {args.hidden} --layers {args.layers} --shard {args.shard} "
               f"--repeats {args.repeats}")
    section = report(runs, checkpoint, equal, command)
    if not args.no_write:
        from bench_doc import write_section

        write_section("bench_export", section)
    print(section)
    if not equal[0]:
        sys.exit("the streaming and the naive export differ")


if __name__ == "__main__":
    main()
