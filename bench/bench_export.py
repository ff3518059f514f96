"""Merged export: streaming shard-by-shard (recallfix) against the naive peer (load, patch, save_pretrained).

Each side runs in its own fresh process, so its peak RSS is its own. Reported as ratios, side by side,
on the same checkpoint: a random Llama-architecture model saved in several shards.

    python bench/bench_export.py [--hidden 512 --layers 8 --shard 20MB]
"""

from __future__ import annotations

import argparse
import json
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
    from recallfix.patches.io import load_model

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
    from recallfix.patches.io import load_model

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
        model.save_pretrained(out, max_shard_size="20MB")
    seconds = time.perf_counter() - start
    sampler.stopped.set()
    sampler.join()
    return {"seconds": seconds, "peak_mb": sampler.peak - baseline}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--shard", default="20MB")
    parser.add_argument("--repeats", type=int, default=3)
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
        runs: dict[str, list[dict]] = {"streaming": [], "naive": []}
        for i in range(args.repeats):
            for kind in runs:  # interleaved, so drift on a shared machine hits both sides alike
                out = tmp / f"{kind}-{i}"
                child = subprocess.run(
                    [sys.executable, __file__, "--side", kind, "--args", json.dumps([str(model_dir), str(patch_file),
                                                                                       str(out)])],
                    capture_output=True, text=True, check=True,
                )
                runs[kind].append(json.loads(child.stdout.strip().splitlines()[-1]))
    best = {k: {m: min(r[m] for r in v) for m in ("seconds", "peak_mb")} for k, v in runs.items()}
    print(f"checkpoint: {total_mb:.0f} MiB in {len(shards)} shards, largest {largest_mb:.0f} MiB "
          f"(Llama, hidden {args.hidden}, {args.layers} layers); best of {args.repeats}")
    print(f"{'':<11}{'peak RSS (MiB)':>20}{'seconds':>10}")
    for kind, r in best.items():
        print(f"{kind:<11}{r['peak_mb']:>20.0f}{r['seconds']:>10.2f}")
    print(f"streaming / naive: memory x{best['streaming']['peak_mb'] / best['naive']['peak_mb']:.2f}, "
          f"time x{best['streaming']['seconds'] / best['naive']['seconds']:.2f}")


if __name__ == "__main__":
    main()
