"""Mixed problem types, end to end: does each type's reward rise when one run trains on all of them?

    python benchmarks/mixed_tasks.py --out /tmp/mixed                  # 300 GRPO steps, ~3 min on 2 CPU cores
    python benchmarks/mixed_tasks.py --out /tmp/mixed --steps 60 --seed 1   # reuses the data and warmed model

1. a synthetic set of 240 items mixing multiple choice (``audio_pitch``, options in fixed order),
   counting (``beep_count``) and temporal retrieval (``tone_span``, spans in a video's sound track);
2. the tiny random Qwen2.5-Omni thinker, given a supervised format warm-up (``--warmup-steps``) whose
   answers are random: a random letter for multiple choice, the answer of a random record of the same
   type otherwise — it learns the answer's form, not which answer is right;
3. GRPO through ``echoink.grpo.trainer.train`` (accuracy + format rewards, the per-record problem type
   decides the accuracy rule);
4. a table from ``metrics.jsonl``: for each type, the mean total reward (``reward_by_type/T``) and
   accuracy reward (``accuracy_by_type/T``) over the first and the last fifth of the steps, and their ratio.

Everything is written under ``--out`` (data and the warmed model are reused when present; the run
directory is replaced). docs/rewards.md gives the measured numbers (the defaults are that run's settings).
Run it on an otherwise idle machine: two torch jobs sharing 2 cores slow each other down many times over.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

FAMILIES = ("audio_pitch", "beep_count", "tone_span")


def prepare(out: Path, config, warmup_steps: int) -> float:
    """Data and the format-warmed tiny model (reused when present); returns the seconds spent."""
    from echoink.data import load_dataset
    from echoink.data.synth import write_synthetic_dataset
    from echoink.demo.format_warmup import format_warmup
    from echoink.model import load_thinker, save_thinker
    from echoink.model.inputs import MediaOptions
    from echoink.model.tiny import write_tiny_checkpoint
    from echoink.prompts import PromptTemplate

    start = time.perf_counter()
    if not Path(config.train_data).is_file():
        write_synthetic_dataset(out / "data", 240, 0, seed=0, families=list(FAMILIES), shuffle_options=False)
    if not (Path(config.model_path) / "config.json").is_file():
        write_tiny_checkpoint(out / "init", layout="thinker", seed=0)
        model, processor = load_thinker(out / "init")
        format_warmup(model, processor, load_dataset(config.train_data), steps=warmup_steps, seed=0,
                      media_options=MediaOptions.from_config(config),
                      template=PromptTemplate.from_dict(config.prompt_template))
        save_thinker(model, processor, Path(config.model_path))
    return time.perf_counter() - start


def summarize(metrics_path: Path) -> list[tuple[str, str, float, float]]:
    """(type, measure, first-fifth mean, last-fifth mean) for every per-type key in metrics.jsonl."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    keys = sorted({key for row in rows for key in row if "_by_type/" in key})
    table = []
    for key in keys:
        values = [row[key] for row in rows if key in row]
        k = max(1, len(values) // 5)
        measure, kind = key.split("/", 1)
        table.append((kind, measure.replace("_by_type", ""), sum(values[:k]) / k, sum(values[-k:]) / k))
    return table


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup-steps", type=int, default=300)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--prompts", type=int, default=12, help="prompts per step (per_device_train_batch_size)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="GRPO seed (data and warm-up always use seed 0)")
    args = parser.parse_args(argv)

    from echoink.config import load_config
    from echoink.grpo.trainer import train

    torch.set_num_threads(args.threads)
    out = args.out
    config = load_config(None, [
        f"model_path={out / 'warm'}", f"train_data={out / 'data/train/omni_rl_format_train.json'}",
        f"output_dir={out / 'run'}", "num_generations=8", f"per_device_train_batch_size={args.prompts}",
        "max_completion_length=32", "beta=0.0", f"learning_rate={args.learning_rate}", "lr_scheduler_type=constant",
        "weight_decay=0.0", "max_grad_norm=1.0", f"max_steps={args.steps}", f"seed={args.seed}",
        f"torch_num_threads={args.threads}", "save_steps=0", "min_pixels=50176",
        # the tiny model does not read English: a short instruction, as in the demo (docs/demo.md)
        "prompt_template={instruction: 'Think, then answer.', suffix: ' Reply <think>...</think><answer>letter</answer>.',"
        " version: mixed-tasks-short}",
    ])
    prepare_seconds = prepare(out, config, args.warmup_steps)
    shutil.rmtree(out / "run", ignore_errors=True)
    start = time.perf_counter()
    train(config, progress=False)
    train_seconds = time.perf_counter() - start

    print(f"\ndata + warm-up {prepare_seconds:.0f} s, {args.steps} GRPO steps {train_seconds:.0f} s "
          f"(lr {args.learning_rate}, warm-up {args.warmup_steps} steps)\n")
    print(f"{'problem type':<20} {'measure':<9} {'first fifth':>11} {'last fifth':>10} {'ratio':>6}")
    for kind, measure, first, last in summarize(out / "run/metrics.jsonl"):
        ratio = f"{last / first:6.2f}" if first > 0 else "   inf" if last > 0 else "     -"
        print(f"{kind:<20} {measure:<9} {first:11.3f} {last:10.3f} {ratio}")


if __name__ == "__main__":
    main()
