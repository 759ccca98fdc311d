"""Spending compute on groups that teach: skip zero-advantage groups, dynamic sampling.

Two parts (results and commands in docs/performance.md):

  step-cost          the same step with 0 %, 50 % and 80 % of its groups zero-variance (constant rewards on
                     chosen groups), skipping on vs off, on the group-sharing benchmark's model shape
                     (P ~ 720, G = 16, C = 128, bench spec, fp32, group_sharing full). The policy and
                     reference phases run through the trainer's own `update` and old/reference pass; the
                     rollout, identical with and without skipping, is timed once per group and added for the
                     whole step. beta = 0.001 (EchoInk-R1's) with skipping forced on, so both phases exist
                     (the skipped groups' KL term is then dropped; with beta = 0 the gradient is identical).

  time-to-accuracy   from a strong start: a tiny model warmed up on two easy synthetic families, then trained
                     on a mix where those families make up most of the data (so many groups are all-correct)
                     and harder ones leave room to rise. Today's trainer (no skipping, no dynamic sampling)
                     runs `--steps` steps; its best greedy eval accuracy (100 items every 10 steps) is A*.
                     Then each setting — today's, skip, dynamic, both — runs with 3 seeds; the training wall
                     time (sum of step_seconds, evaluation excluded) and the rollouts until the first eval
                     >= A* are reported as median and range.

    python benchmarks/informative_groups.py step-cost
    python benchmarks/informative_groups.py time-to-accuracy --out bench_out/informative --steps 60
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

EASY = ["image_colour", "audio_pitch"]
MIX = ["image_colour", "audio_pitch", "image_shape", "audio_beeps"]
SETTINGS = {
    "today": ["skip_zero_advantage_groups=false", "dynamic_sampling=false"],
    "skip": ["skip_zero_advantage_groups=true", "dynamic_sampling=false"],
    "dynamic": ["skip_zero_advantage_groups=false", "dynamic_sampling=true", "max_sampling_rounds=3"],
    "both": ["skip_zero_advantage_groups=true", "dynamic_sampling=true", "max_sampling_rounds=3"],
}


# ---- part 1: step cost -------------------------------------------------------------------------------------

def step_cost(args) -> None:
    import torch
    from accelerate import Accelerator
    from group_sharing import build_prompt

    from echoink.config import TrainConfig
    from echoink.grpo import group_advantages
    from echoink.grpo.logprobs import Policy
    from echoink.grpo.loss import GRPOLoss, StepCounts
    from echoink.grpo.step import StepContext, _with_old_and_reference_logps, update
    from echoink.grpo.types import CollectedBatch, ScoredGroup
    from echoink.model.engine import Group, SharedPrefillEngine
    from echoink.model.generation import SamplingSettings, completion_mask
    from echoink.model.families.qwen2_5_omni import FAMILY as QWEN2_5_OMNI
    from echoink.model.tiny import SPECS, build_tiny_thinker

    if args.threads:
        torch.set_num_threads(args.threads)
    g, c, b = args.generations, args.completion_length, args.groups
    model, processor = build_tiny_thinker(SPECS["bench"], seed=0)
    tokenizer = processor.tokenizer
    prompt = build_prompt(processor)
    eos = QWEN2_5_OMNI.eos_id(tokenizer)
    first_special = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    generator = torch.Generator().manual_seed(0)
    groups = []
    for _ in range(b):
        ids = torch.randint(0, first_special, (g, c), generator=generator)  # never EOS: every completion has C tokens
        mask, truncated = completion_mask(ids, eos)
        groups.append(Group(prompt=prompt, completion_ids=ids, completion_mask=mask, texts=[""] * g,
                            truncated=truncated))

    model.eval()
    t0 = time.perf_counter()
    torch.manual_seed(0)
    SharedPrefillEngine(model, tokenizer).generate([prompt], SamplingSettings(num_generations=g, max_new_tokens=c,
                                                                               min_new_tokens=c))
    rollout_per_group = time.perf_counter() - t0

    config = TrainConfig(num_generations=g, max_completion_length=c, beta=0.001, per_device_train_batch_size=b,
                         group_sharing="full", max_grad_norm=1.0)
    rows = []
    for zero_share in args.zero_shares:
        zero = round(zero_share * b)
        rewards = torch.cat([torch.full((g,), 0.7) if i < zero else (torch.arange(g) % 2).float() for i in range(b)])
        advantages = group_advantages(rewards, g).split(g)
        # without skipping every group is trained whatever the share (the same work): measured once, at the first share
        for skip in ((False, True) if zero_share == args.zero_shares[0] else (True,)):
            scored = [ScoredGroup(group=grp, record=None, rewards=r.view(g, 1), advantages=a,
                                  trained=not (skip and not bool(a.any())))
                      for grp, r, a in zip(groups, rewards.split(g), advantages)]
            policy = Policy(model)
            optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
            context = StepContext(config, Accelerator(cpu=True), policy, model, None, model, None, optimizer, scheduler,
                                  processor, None, GRPOLoss.from_config(config), None, None, None, torch.float32)
            t0 = time.perf_counter()
            with_ref = _with_old_and_reference_logps(context, [scored])
            reference_s = time.perf_counter() - t0
            tokens = int(sum(grp.completion_mask.sum() for grp in groups))
            batch = CollectedBatch(micro_batches=(tuple(with_ref[0]),), counts=StepCounts(b * g, tokens, 1, 1),
                                   stats={})
            policy_s = update(context, batch)["backward_seconds"]
            rows.append({"zero_share": zero_share, "skip": skip, "reference_s": reference_s, "policy_s": policy_s,
                         "rollout_s": rollout_per_group * b, "trained_groups": sum(s.trained for s in scored)})
            print(f"#   {zero_share:.0%} zero-variance, skip={skip}: reference {reference_s:.1f} s, "
                  f"policy {policy_s:.1f} s", flush=True)
    print(f"\n# step cost: B={b} groups, G={g}, C={c}, P={prompt.length}, bench spec, fp32, group_sharing full, "
          f"beta=0.001, threads={torch.get_num_threads()}, rollout {rollout_per_group:.1f} s per group (same with "
          "and without skipping)\n")
    print("Skipping off trains every group whatever the share of zero-variance groups, so it is measured once "
          "(the first row) and is the base of every ratio.\n")
    print("| zero-variance groups | skip | trained groups | reference s | policy fwd+bwd s | policy+ref s | "
          "policy+ref × | whole step s | whole step × |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        base = next(r for r in rows if not r["skip"])  # skipping off: the same work at every share
        phases, base_phases = row["reference_s"] + row["policy_s"], base["reference_s"] + base["policy_s"]
        whole, base_whole = phases + row["rollout_s"], base_phases + base["rollout_s"]
        print(f"| {row['zero_share']:.0%} | {'on' if row['skip'] else 'off'} | {row['trained_groups']}/{b} | "
              f"{row['reference_s']:.1f} | {row['policy_s']:.1f} | {phases:.1f} | {phases / base_phases:.2f} | "
              f"{whole:.1f} | {whole / base_whole:.2f} |")


# ---- part 2: time to accuracy from a strong start ---------------------------------------------------------------

def _prepare(out: Path, warm_steps: int) -> tuple[Path, Path, Path]:
    """Data (the mix, fixed option order), and the warm start: format warm-up + GRPO on the easy families."""
    from echoink.config import load_config
    from echoink.data.synth import write_synthetic_dataset
    from echoink.demo import DEMO_CONFIG, prepare_demo_inputs
    from echoink.grpo.trainer import train

    mix = out / "mix"
    if not (mix / "valid" / "omni_rl_format_valid.json").is_file():
        write_synthetic_dataset(mix, 800, 200, seed=7, families=MIX, shuffle_options=False)
    warm = out / "warm" / "run" / "final"
    if not (warm / "config.json").is_file():
        base = out / "warm"
        config = load_config(DEMO_CONFIG, [f"output_dir={base / 'run'}", f"model_path={base / 'model_warm'}",
                                           f"train_data={base / 'data/train/omni_rl_format_train.json'}",
                                           f"eval_data={base / 'data/valid/omni_rl_format_valid.json'}",
                                           f"max_steps={warm_steps}", "eval_steps=0",
                                           "overwrite_output_dir=true"])  # an unfinished warm-up run is redone
        prepare_demo_inputs(base, config)
        train(config, progress=False)
    return warm, mix / "train" / "omni_rl_format_train.json", mix / "valid" / "omni_rl_format_valid.json"


def _run(out: Path, name: str, warm: Path, train_json: Path, valid_json: Path, steps: int, seed: int,
         extra: list[str]) -> list[dict]:
    from echoink.config import load_config
    from echoink.demo import DEMO_CONFIG
    from echoink.eval.run import training_evaluator
    from echoink.grpo.trainer import train

    run_dir = out / "runs" / f"{name}-seed{seed}"
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        config = load_config(DEMO_CONFIG, [f"output_dir={run_dir}", f"model_path={warm}", f"train_data={train_json}",
                                           f"eval_data={valid_json}", f"max_steps={steps}", f"seed={seed}",
                                           "eval_steps=10", "eval_limit=100", "beta=0", *extra])
        train(config, progress=False, evaluate=training_evaluator(config))
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def _first_reach(rows: list[dict], target: float) -> tuple[float, float, int] | None:
    """(training seconds, rollouts, step) at the first eval >= target, evaluation time excluded."""
    seconds = rollouts = 0.0
    for row in rows:
        seconds += row["step_seconds"]  # measured before the step's evaluation
        rollouts += row["rollout_groups"]
        if row.get("eval/accuracy") is not None and row["eval/accuracy"] >= target - 1e-9:
            return seconds, rollouts, int(row["step"])
    return None


def time_to_accuracy(args) -> None:
    import torch

    torch.set_num_threads(args.threads or 2)
    out = args.out
    warm, train_json, valid_json = _prepare(out, args.warm_steps)
    baseline = _run(out, "today", warm, train_json, valid_json, args.steps, 0, SETTINGS["today"])
    evals = [(r["step"], r["eval/accuracy"]) for r in baseline if "eval/accuracy" in r]
    target = max(acc for _, acc in evals)
    start = evals[0][1]
    print(f"# baseline (today's trainer, seed 0, {args.steps} steps): eval accuracy {evals}; A* = {target:.2f}")
    table = []
    for name, extra in SETTINGS.items():
        reached = []
        for seed in args.seeds:
            rows = _run(out, name, warm, train_json, valid_json, args.steps, seed, extra)
            hit = _first_reach(rows, target)
            informative = [r["informative_groups"] / max(1.0, r["num_groups"]) for r in rows]
            print(f"#   {name} seed {seed}: {'A* at step %d after %.0f s, %d rollouts' % (hit[2], hit[0], hit[1]) if hit else 'A* not reached'}; "
                  f"mean informative share {statistics.mean(informative):.2f}", flush=True)
            reached.append(hit)
        table.append((name, reached))
    print(f"\n# time to A* = {target:.2f} (baseline start {start:.2f}); warm start: {args.warm_steps} demo steps; "
          f"{args.steps} steps per run; seeds {args.seeds}\n")
    print("| setting | reached | wall s to A* (median, range) | × today | rollouts to A* (median, range) |")
    print("|---|---|---|---|---|")
    hits_by_name = {name: [h for h in reached if h] for name, reached in table}
    today = statistics.median(h[0] for h in hits_by_name["today"]) if hits_by_name["today"] else None
    for name, reached in table:
        hits = hits_by_name[name]
        if not hits:
            print(f"| {name} | 0/{len(reached)} | - | - | - |")
            continue
        wall, rollouts = statistics.median(h[0] for h in hits), statistics.median(h[1] for h in hits)
        ratio = f"{wall / today:.2f}" if today else "-"
        print(f"| {name} | {len(hits)}/{len(reached)} | {wall:.0f} ({min(h[0] for h in hits):.0f}-"
              f"{max(h[0] for h in hits):.0f}) | {ratio} | {rollouts:.0f} "
              f"({min(h[1] for h in hits):.0f}-{max(h[1] for h in hits):.0f}) |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="part", required=True)
    cost = sub.add_parser("step-cost")
    cost.add_argument("--groups", type=int, default=10)
    cost.add_argument("--generations", type=int, default=16)
    cost.add_argument("--completion-length", type=int, default=128)
    cost.add_argument("--zero-shares", type=float, nargs="+", default=[0.0, 0.5, 0.8])
    cost.add_argument("--threads", type=int, default=0)
    tta = sub.add_parser("time-to-accuracy")
    tta.add_argument("--out", type=Path, default=Path("bench_out/informative"))
    tta.add_argument("--steps", type=int, default=60)
    tta.add_argument("--warm-steps", type=int, default=200)
    tta.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    tta.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    step_cost(args) if args.part == "step-cost" else time_to_accuracy(args)


if __name__ == "__main__":
    main()
