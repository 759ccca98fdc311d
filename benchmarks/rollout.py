"""Rollout benchmark: completion tokens per second when B groups are decoded in one loop (B = 1, 4, 8).

    python benchmarks/rollout.py                                        # tiny + bench specs, CPU, fixed and spread
    python benchmarks/rollout.py --family qwen3-omni --spec tiny --generations 8
    python benchmarks/rollout.py --spec bench --generations 16 --lengths spread
    python benchmarks/rollout.py --device cuda --dtype bfloat16 --spec 7b-shaped --batch-sizes 1 2 4 8 16
    python benchmarks/rollout.py --smoke                                # seconds: a check that it runs

The same N = max(batch sizes) prompts (image + audio questions of a synthetic set, built with the
processor; P ~ 260-320 tokens) are rolled out with `rollout_batch_size` B: N / B loops of B groups of G
completions each, through the shared-prefill engine (prefill once per prompt, every group of a loop in
one decode loop). Every prompt draws from its own seeded stream, so every B produces the very same
tokens (checked): the runs differ only in how the work is batched, and tokens/s ratios are time ratios.

Lengths:
    fixed    every completion exactly C tokens (EOS suppressed until then: min_new_tokens = C)
    spread   completions end where EOS is sampled: the output head's EOS logit gets a bias so that a
             row stops with probability ~1/`--mean-length` per step (lengths roughly geometric, capped
             at C); the table gives the lengths' mean and 10th / 90th percentiles. A loop then runs
             until its longest completion ends while finished rows leave it (compaction).

Columns: loops, decode steps (language-model forwards after the prefills), rows per decode step,
completion tokens (up to and including EOS), seconds (wall, median of --repeats after a warm-up),
completion tokens per second and its ratio to B = 1.

Specs: the family's tiny builder at "tiny" (text hidden 128 x 2 layers) or "bench" (512 x 4);
"7b-shaped" (Qwen2.5-Omni only): Qwen2.5-Omni-7B's widths, heads and M-RoPE sections (text 3584,
28 heads, 4 K/V heads, MLP 18944; audio 1280 x 20 heads; vision 1280 x 16 heads) with two layers per
stack, random weights and the tiny tokenizer's vocabulary — a GPU shape (about 0.5 B parameters).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

SPECS = ("tiny", "bench", "7b-shaped")
TINY_BUILDERS = {"qwen2.5-omni": "echoink.model.tiny", "qwen3-omni": "echoink.model.families.qwen3_omni_tiny"}


def build_model(family: str, spec: str, dtype: str, device: str):
    import importlib

    import torch

    builder = importlib.import_module(TINY_BUILDERS[family])
    if spec == "7b-shaped":
        if family != "qwen2.5-omni":
            raise SystemExit("--spec 7b-shaped is Qwen2.5-Omni-7B's shape: use --family qwen2.5-omni")
        shape = replace(builder.TINY, text_hidden=3584, text_layers=2, text_heads=28, text_kv_heads=4,
                        text_intermediate=18944, audio_d_model=1280, audio_layers=2, audio_heads=20,
                        vision_hidden=1280, vision_layers=2, vision_heads=16)
    else:
        shape = builder.SPECS[spec]
    model, processor = builder.build_tiny_thinker(shape, seed=0)
    return model.to(device=device, dtype=getattr(torch, dtype)).eval(), processor


def build_prompts(processor, count: int, device: str, dtype: str):
    """`count` image + audio prompts of a synthetic set, encoded once (outside the timed rollouts)."""
    import torch

    from echoink.data import load_dataset
    from echoink.data.synth import write_synthetic_dataset
    from echoink.model.inputs import encode_prompt

    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic_dataset(Path(tmp), max(48, 6 * count), 4, seed=0)
        records = [r for r in load_dataset(Path(tmp) / "train" / "omni_rl_format_train.json")
                   if r.data_type == "image_audio"][:count]
        if len(records) < count:
            raise SystemExit(f"the synthetic set has only {len(records)} image + audio records (asked {count})")
        return [encode_prompt(r, processor).to(device, getattr(torch, dtype)) for r in records]


def eos_bias_for(mean_length: float, vocab: int) -> float:
    """The EOS logit bias that makes EOS ~1/mean_length likely per step when the other logits are ~equal."""
    import math

    hazard = 1.0 / mean_length
    return math.log(hazard * vocab / (1.0 - hazard))


def with_eos_bias(model, eos_id: int, bias: float):
    """The output head's EOS logit raised by `bias` (in place; the benchmark's own model)."""
    import torch

    head = model.lm_head
    added = torch.zeros(head.out_features, dtype=head.weight.dtype, device=head.weight.device)
    added[eos_id] = bias
    head.bias = torch.nn.Parameter(added if head.bias is None else head.bias + added, requires_grad=False)
    return model


def rollout(model, processor, prompts, sampling, seeds, batch_size):
    """-> (groups' completion ids, DecodeStats) through the shared-prefill engine, `batch_size` prompts a loop."""
    from echoink.model.engine import SharedPrefillEngine, prompt_generators

    engine = SharedPrefillEngine(model, processor.tokenizer, batch_size=batch_size)
    groups = engine.generate(prompts, sampling, prompt_generators(seeds, prompts[0].input_ids.device))
    return [group.completion_ids for group in groups], engine.stats


def measure(args, family: str, spec: str, generations: int, lengths: str) -> list[dict]:
    import torch

    from echoink.model.engine import prompt_seed
    from echoink.model.families import family_of_model
    from echoink.model.generation import SamplingSettings

    model, processor = build_model(family, spec, args.dtype, args.device)
    count = max(args.batch_sizes)
    prompts = build_prompts(processor, count, args.device, args.dtype)
    c = args.max_new_tokens
    if lengths == "fixed":
        sampling = SamplingSettings(num_generations=generations, max_new_tokens=c, min_new_tokens=c)
    else:
        sampling = SamplingSettings(num_generations=generations, max_new_tokens=c)
        eos_id = family_of_model(model).eos_id(processor.tokenizer)
        with_eos_bias(model, eos_id, eos_bias_for(args.mean_length, model.lm_head.out_features))
    seeds = [prompt_seed(0, 0, position) for position in range(count)]
    rollout(model, processor, prompts[:1], replace(sampling, max_new_tokens=4, min_new_tokens=0), seeds[:1], 1)
    rows, reference = [], None
    for b in args.batch_sizes:
        times = []
        for _ in range(args.repeats):
            _sync(args.device)
            start = time.perf_counter()
            ids, stats = rollout(model, processor, prompts, sampling, seeds, b)
            _sync(args.device)
            times.append(time.perf_counter() - start)
        if reference is None:
            reference = ids
        elif not all(torch.equal(x.cpu(), y.cpu()) for x, y in zip(ids, reference)):
            raise SystemExit(f"B = {b} gave other tokens than B = {args.batch_sizes[0]}: per-prompt streams broken")
        seconds = statistics.median(times)
        pad = processor.tokenizer.pad_token_id
        per_row = torch.cat([(group != pad).sum(dim=1) for group in ids]).float()
        rows.append({"family": family, "spec": spec, "G": generations, "lengths": lengths, "C": c, "B": b,
                     "prompts": count, "loops": stats.loops, "decode_steps": stats.decode_steps,
                     "rows_per_step": stats.rows_per_step, "completion_tokens": stats.completion_tokens,
                     "seconds": seconds, "tokens_per_second": stats.completion_tokens / seconds,
                     "length_mean": per_row.mean().item(), "length_p10": per_row.quantile(0.1).item(),
                     "length_p90": per_row.quantile(0.9).item(), "dtype": args.dtype, "device": args.device})
    base = rows[0]["tokens_per_second"]
    for row in rows:
        row["ratio"] = row["tokens_per_second"] / base
    return rows


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def format_table(rows: list[dict]) -> str:
    head = ("| family | spec | G | lengths (mean, p10-p90) | B | loops | decode steps | rows / step | completion "
            "tokens | s | tokens/s | × B=1 |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        spread = f"{r['lengths']} ({r['length_mean']:.0f}, {r['length_p10']:.0f}-{r['length_p90']:.0f})"
        lines.append(f"| {r['family']} | {r['spec']} | {r['G']} | {spread} | {r['B']} | {r['loops']} | "
                     f"{r['decode_steps']} | {r['rows_per_step']:.1f} | {r['completion_tokens']:,} | "
                     f"{r['seconds']:.2f} | {r['tokens_per_second']:.0f} | {r['ratio']:.2f} |")
    return "\n".join(lines)


DEFAULT_RUNS = (("qwen2.5-omni", "tiny", 8), ("qwen3-omni", "tiny", 8), ("qwen2.5-omni", "bench", 16))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=sorted(TINY_BUILDERS), default=None,
                        help="one family (default: the issue's set: tiny G=8 both families, bench G=16 Qwen2.5)")
    parser.add_argument("--spec", choices=SPECS, default=None)
    parser.add_argument("--generations", type=int, default=None, help="G (default 8 for tiny, 16 otherwise)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--lengths", choices=["fixed", "spread", "both"], default="both")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="C: the fixed length, the spread's cap")
    parser.add_argument("--mean-length", type=float, default=24.0, help="spread: mean completion length sought")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per B (median)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat: checks that it runs")
    args = parser.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        args.batch_sizes, args.max_new_tokens, args.repeats, args.mean_length = [1, 2], 6, 1, 3.0
    if args.family or args.spec:
        family, spec = args.family or "qwen2.5-omni", args.spec or "tiny"
        runs = [(family, spec, args.generations or (8 if spec == "tiny" else 16))]
    else:
        runs = [(f, s, args.generations or g) for f, s, g in DEFAULT_RUNS]
    if args.smoke:
        runs = [(f, "tiny", 2) for f in sorted({f for f, _, _ in runs})]
    kinds = ("fixed", "spread") if args.lengths == "both" else (args.lengths,)
    rows = [row for family, spec, g in runs for kind in kinds for row in measure(args, family, spec, g, kind)]
    print(f"rollout throughput ({args.device}, {args.dtype}, torch threads {torch.get_num_threads()}, "
          f"C = {args.max_new_tokens}, {args.repeats} timed runs per row)")
    print(format_table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1), encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
