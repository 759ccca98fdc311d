"""Group sharing benchmark: one GRPO step, group_sharing none (plain) vs encoders vs full.

    python benchmarks/group_sharing.py                                  # CPU, C = 128 and 256, G = 16
    python benchmarks/group_sharing.py --gradient-checkpointing
    python benchmarks/group_sharing.py --dtype bfloat16 --device cuda   # GPU
    python benchmarks/group_sharing.py --family qwen3-omni              # the Qwen3-Omni (MoE) thinker

Model: the family's tiny builder at size "bench" ("tiny but realistic in shape": text hidden 512 x 4
layers, vision and audio encoders of 4 layers), random weights: `echoink.model.tiny` for
qwen2.5-omni (dense), `echoink.model.families.qwen3_omni_tiny` for qwen3-omni (16 experts, top-2,
a deepstack layer). Prompt: a 448x448 image (256 image
tokens), 10 s of a tone (250 audio tokens) and a long-ish question (P ~ 720), built directly with
the processor. Each step, for G completions of exactly C tokens:

    rollout     sample C new tokens per completion (EOS suppressed by min_new_tokens = C)
    policy      per-token log-probs with grad + backward (train mode; checkpointing if asked)
    reference   per-token log-probs without grad (eval mode; the same weights stand in for the
                reference model — the computation is the same)

The log-prob phases score random completion ids (no EOS), so every completion has exactly C
tokens. Paths (what `TrainConfig.group_sharing` selects):

    none        generate(num_return_sequences=G); log-probs of G x [prompt, completion]
    encoders    generate(num_return_sequences=G); encoders once per prompt in log-prob passes
    full        prefill once in the rollout; prompt once in log-prob passes (prompt K/V shared)
    full-packed as full, but log-prob passes pack [prompt, c_1 .. c_G] with a block-causal mask

Method. Every (path, C) runs in a fresh worker process (`--worker`), which builds the same model
(same seed) and prompt, runs a small warm-up step (G=2, C=8), then one measured step; `--repeats`
rounds run every configuration again, interleaved, and times are medians over rounds. "cpu s" is
the process's CPU time (all threads), less sensitive than wall time to other load on the machine.
OpenMP threads spin briefly, then sleep (GOMP_SPINCOUNT=10000, `--spin-count`): on a CPU shared
with other work, libgomp's default long spin made small decode-step kernels up to 50x slower, and
sleeping at once (OMP_WAIT_POLICY=PASSIVE) adds a wake-up to every parallel region (decode steps
~1.6x slower). Both paths run under the same setting.
Memory: on CPU, each phase starts with `malloc_trim(0)` and a reset of the kernel's resident-set
high-water mark (`/proc/self/clear_refs` = 5); the phase's peak is VmHWM at its end — the
process's true peak RSS during that phase (weights, libraries, allocator caches and all). "+act"
is that peak minus the RSS just before the step. One process per configuration is needed because
freed memory stays in the process. On CUDA the peaks are `torch.cuda.max_memory_allocated`.
"live" is the peak of the bytes the process holds allocated, sampled after every torch op in an extra,
untimed repeat of the step (glibc's `mallinfo2`: heap in use + mmapped blocks; on CUDA it is the same
number as "peak"). RSS also counts what glibc keeps after a free (heap holes it does not return to the
kernel): that part varies from run to run with the order of allocations — the same code measured
1700 to 1980 MiB for the Qwen3-Omni full path at C = 256 — while "live" repeats to the MiB. "live" is
what CUDA's peak measures, so it is the one that carries over to a GPU.
Tokens: how many token positions the language model processes in the step (prefill + decode + the
two log-prob passes), and how many times the encoders run.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

PATHS = ("none", "encoders", "full", "full-packed")
SHARING = {"none": ("none", "auto"), "encoders": ("encoders", "auto"), "full": ("full", "kv"),
           "full-packed": ("full", "packed")}
PHASES = ("rollout", "policy", "reference")
# family name (echoink.model.families) -> the module of its offline tiny builder (SPECS, build_tiny_thinker)
TINY_BUILDERS = {"qwen2.5-omni": "echoink.model.tiny", "qwen3-omni": "echoink.model.families.qwen3_omni_tiny"}
QUESTION = (  # ~180 tokens, so that P ~ 720 with the image and the audio
    "The picture shows circles in four colours, each colour a different number of times. Which colour appears "
    "as many times as the number of beeps you hear? Options: A. red B. green C. blue D. yellow. "
    "Please think about this question as if you were a human pondering deeply. Make sure to carefully consider "
    "both the visual and audio information before answering. Engage in an internal dialogue using expressions "
    "such as 'let me think', 'wait', 'Hmm', 'oh, I see', 'let's break it down', etc, or other natural language "
    "thought expressions. Provide your detailed reasoning between the <think> </think> tags, and then give "
    "your final answer between the <answer> </answer> tags."
)


# ---- worker: one configuration, one process ----------------------------------------------------------

def build_prompt(processor):
    """A 448x448 image + 10 s tone + question, straight through the processor -> PromptInputs."""
    import numpy as np
    import torch
    from PIL import Image, ImageDraw

    from echoink.model.inputs import MEDIA_KEYS, PromptInputs

    rng = np.random.default_rng(0)
    image = Image.new("RGB", (448, 448), (40, 40, 40))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x, y = (int(v) for v in rng.integers(20, 428, size=2))
        draw.ellipse([x - 18, y - 18, x + 18, y + 18], fill=tuple(int(v) for v in rng.integers(0, 255, size=3)))
    t = np.arange(10 * 16000) / 16000
    audio = (0.5 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)
    messages = [{"role": "user", "content": [{"type": "image", "image": "img"}, {"type": "audio", "audio": "wav"},
                                             {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    encoded = processor(text=[text], images=[image], audio=[audio], return_tensors="pt")
    media = {key: torch.as_tensor(encoded[key]) for key in MEDIA_KEYS if key in encoded}
    return PromptInputs(input_ids=torch.as_tensor(encoded["input_ids"]), media=media)


class Memory:
    """Per-phase peak memory in MiB (CPU: VmHWM after a reset; CUDA: max_memory_allocated)."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        try:
            self.libc = ctypes.CDLL("libc.so.6")
        except OSError:
            self.libc = None

    def current(self) -> float:
        import torch

        if self.cuda:
            return torch.cuda.memory_allocated() / 2**20
        return _status_kib("VmRSS") / 1024

    def reset(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            return
        if self.libc is not None:
            self.libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def peak(self) -> float:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20
        return _status_kib("VmHWM") / 1024


class LiveMemory:
    """Peak of the bytes held allocated (CPU: glibc `mallinfo2`, heap in use + mmapped), sampled after every
    torch op while `measure` runs. `available` is False where glibc or its mallinfo2 is missing."""

    def __init__(self, libc) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        class _Mallinfo2(ctypes.Structure):
            _fields_ = [(name, ctypes.c_size_t) for name in
                        ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                         "fordblks", "keepcost")]

        mallinfo2 = getattr(libc, "mallinfo2", None)
        if mallinfo2 is None:
            self.available = False
            return
        mallinfo2.restype = _Mallinfo2
        self.available, self.peak = True, 0.0
        tracker = self

        def held() -> float:
            info = mallinfo2()
            return (info.uordblks + info.hblkhd) / 2**20

        class Sampler(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker.peak = max(tracker.peak, held())
                return out

        self._held, self._sampler = held, Sampler

    def measure(self, fn):
        """-> (fn(), peak MiB held while it ran)."""
        self.peak = self._held()
        with self._sampler():
            out = fn()
        return out, self.peak


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def step_tokens(path: str, p: int, g: int, c: int) -> dict:
    """Token positions through the language model and encoder runs, per phase (G completions of C tokens)."""
    rollout = p + g * (c - 1) if path.startswith("full") else g * p + g * (c - 1)
    logprob = p + g * (c - 1) if path.startswith("full") else g * (p + c)
    encoders_per_pass = 1 if path != "none" else g
    return {"lm_tokens": rollout + 2 * logprob, "lm_tokens_rollout": rollout, "lm_tokens_logprob": logprob,
            "encoder_runs": (1 if path.startswith("full") else g) + 2 * encoders_per_pass}


def run_worker(args) -> dict:
    import torch

    from echoink.grpo.logprobs import group_token_logps
    from echoink.model.engine import Group, rollout_engine
    from echoink.model.families import family_of_model
    from echoink.model.generation import SamplingSettings, completion_mask

    tiny = importlib.import_module(TINY_BUILDERS[args.family])
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model, processor = tiny.build_tiny_thinker(tiny.SPECS[args.spec], seed=0)
    model = model.to(device=device, dtype=dtype)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tokenizer = processor.tokenizer
    prompt = build_prompt(processor).to(device, dtype)
    sharing, prefix = SHARING[args.path]
    memory = Memory(args.device)
    engine = rollout_engine(model, tokenizer, sharing)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    live = LiveMemory(memory.libc) if device.type == "cpu" else None

    def one_step(g: int, c: int, seed: int, sample_live: bool = False) -> dict:
        times, cpu, peaks = {}, {}, {}
        generator = torch.Generator().manual_seed(seed)
        first_special = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        ids = torch.randint(0, first_special, (g, c), generator=generator).to(device)  # never EOS
        mask, truncated = completion_mask(ids, family_of_model(model).eos_id(tokenizer))
        group = Group(prompt=prompt, completion_ids=ids, completion_mask=mask, texts=[""] * g, truncated=truncated)
        advantages = torch.randn(g, 1, generator=generator).to(device)

        def phase(name, fn):
            memory.reset()
            if sample_live:  # untimed: the sampling slows every op
                _, peaks[name] = live.measure(fn)
                return
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            out = fn()
            sync()
            times[name] = time.perf_counter() - t0
            cpu[name] = time.process_time() - c0
            peaks[name] = memory.peak()
            return out

        def rollout():
            model.eval()
            torch.manual_seed(seed)
            sampling = SamplingSettings(num_generations=g, max_new_tokens=c, min_new_tokens=c)
            sampled = engine.generate([prompt], sampling)[0]
            assert sampled.completion_ids.shape == (g, c) and bool(sampled.completion_mask.all()), "C must be exact"

        def policy():
            model.train()
            logps = group_token_logps(model, [group], sharing=sharing, prefix=prefix)[0]
            loss = -(logps * advantages * group.completion_mask).sum() / group.completion_mask.sum()
            loss.backward()
            model.zero_grad(set_to_none=True)

        def reference():
            model.eval()
            with torch.no_grad():
                group_token_logps(model, [group], sharing=sharing, prefix=prefix)

        memory.reset()
        before = memory.current()
        phase("rollout", rollout)
        phase("policy", policy)
        phase("reference", reference)
        if sample_live:
            return {"live": {**peaks, "step": max(peaks.values())}}
        times["step"], cpu["step"], peaks["step"] = sum(times.values()), sum(cpu.values()), max(peaks.values())
        return {"times": times, "cpu": cpu, "peaks": peaks, "rss_before": before}

    one_step(2, 8, seed=1)  # warm-up: kernels, allocator, lazy initialisation
    measured = one_step(args.generations, args.completion_length, seed=100)
    if live is not None and live.available:
        measured.update(one_step(args.generations, args.completion_length, seed=100, sample_live=True))
    elif device.type == "cuda":  # max_memory_allocated already counts live tensors only
        measured["live"] = dict(measured["peaks"])
    return {
        "family": args.family, "path": args.path, "C": args.completion_length, "G": args.generations, "P": prompt.length,
        "gradient_checkpointing": args.gradient_checkpointing, "device": args.device, "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        **measured,
        **step_tokens(args.path, prompt.length, args.generations, args.completion_length),
    }


# ---- driver --------------------------------------------------------------------------------------------

def run_config(args, path: str, c: int) -> dict:
    command = [sys.executable, __file__, "--worker", "--path", path, "--completion-length", str(c),
               "--generations", str(args.generations), "--dtype", args.dtype,
               "--device", args.device, "--spec", args.spec, "--family", args.family, "--threads", str(args.threads)]
    if args.gradient_checkpointing:
        command.append("--gradient-checkpointing")
    done = subprocess.run(command, capture_output=True, text=True, env=worker_env(args.spin_count))
    if done.returncode != 0:
        raise SystemExit(f"worker {path} C={c} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def worker_env(spin_count: int) -> dict:
    """OpenMP waiting: spin `spin_count` iterations, then sleep (0: sleep at once, OMP_WAIT_POLICY=PASSIVE)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if spin_count > 0:
        env["GOMP_SPINCOUNT"] = str(spin_count)
    else:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    return env


def aggregate(runs: list[dict]) -> dict:
    """Rounds of one configuration -> median times, highest peaks."""
    out = dict(runs[0])
    for key in ("times", "cpu"):
        out[key] = {k: statistics.median(r[key][k] for r in runs) for k in runs[0][key]}
    out["peaks"] = {k: max(r["peaks"][k] for r in runs) for k in runs[0]["peaks"]}
    if all("live" in r for r in runs):
        out["live"] = {k: max(r["live"][k] for r in runs) for k in runs[0]["live"]}
    out["rss_before"] = statistics.median(r["rss_before"] for r in runs)
    out["rounds"] = len(runs)
    return out


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def format_table(results: list[dict]) -> str:
    """Markdown table; ratios are against group_sharing none (the plain path) at the same C."""
    plain = {r["C"]: r for r in results if r["path"] == "none"}
    head = ("| C | path | rollout s | policy fwd+bwd s | reference s | step s | step × | rollout × | policy × | "
            "step cpu s | cpu × | LM tokens | encoder runs | peak MiB | peak × | +act MiB | +act × | "
            "live MiB | live × |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        base = plain.get(r["C"])

        def ratio(a, b):
            return f"{a / b:.2f}" if base and b else "-"

        t, pk = r["times"], r["peaks"]
        act = pk["step"] - r["rss_before"]
        base_act = base["peaks"]["step"] - base["rss_before"] if base else None
        lines.append(
            f"| {r['C']} | {r['path']} | {t['rollout']:.2f} | {t['policy']:.2f} | {t['reference']:.2f} | "
            f"{t['step']:.2f} | {ratio(t['step'], base['times']['step'] if base else 0)} | "
            f"{ratio(t['rollout'], base['times']['rollout'] if base else 0)} | "
            f"{ratio(t['policy'], base['times']['policy'] if base else 0)} | {r['cpu']['step']:.2f} | "
            f"{ratio(r['cpu']['step'], base['cpu']['step'] if base else 0)} | {r['lm_tokens']:,} | "
            f"{r['encoder_runs']} | "
            f"{pk['step']:.0f} | {ratio(pk['step'], base['peaks']['step'] if base else 0)} | {act:.0f} | "
            f"{ratio(act, base_act or 0)} | {_live(r)} | "
            f"{ratio(r['live']['step'], base['live']['step']) if 'live' in r and base and 'live' in base else '-'} |")
    return "\n".join(lines)


def _live(result: dict) -> str:
    return f"{result['live']['step']:.0f}" if "live" in result else "n/a"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--completion-lengths", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--generations", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1, help="rounds over all configurations (median time)")
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=None,
                        help="default: none encoders full (+ full-packed with --gradient-checkpointing)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--spec", default="bench", choices=["tiny", "bench"])
    parser.add_argument("--family", default="qwen2.5-omni", choices=sorted(TINY_BUILDERS),
                        help="model family of the tiny thinker (its builder's `--spec` size)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--spin-count", type=int, default=10000,
                        help="GOMP_SPINCOUNT for the workers (0: OMP_WAIT_POLICY=PASSIVE); see the docstring")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    # worker mode (one configuration per process)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--path", choices=PATHS, help=argparse.SUPPRESS)
    parser.add_argument("--completion-length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    if args.worker:
        print(json.dumps(run_worker(args)))
        return

    paths = args.paths or (["none", "encoders", "full"] + (["full-packed"] if args.gradient_checkpointing else []))
    if "none" not in paths:
        paths = ["none", *paths]
    started, load_before = time.perf_counter(), loadavg()
    print(f"# group sharing: family={args.family} G={args.generations} C={args.completion_lengths} "
          f"gradient_checkpointing={args.gradient_checkpointing} device={args.device} dtype={args.dtype} "
          f"repeats={args.repeats} spin_count={args.spin_count} cpus={os.cpu_count()} load={load_before}", flush=True)
    runs: dict[tuple[int, str], list[dict]] = {}
    for round_ in range(args.repeats):  # rounds interleave the configurations, so load drift hits all alike
        for c in args.completion_lengths:
            for path in paths:
                result = run_config(args, path, c)
                runs.setdefault((c, path), []).append(result)
                print(f"#   round {round_ + 1} C={c} {path}: step {result['times']['step']:.2f} s "
                      f"(cpu {result['cpu']['step']:.2f} s), peak {result['peaks']['step']:.0f} MiB, live {_live(result)} MiB "
                      f"(P={result['P']}, threads={result['threads']}, load {loadavg()})", flush=True)
    results = [aggregate(runs[(c, path)]) for c in args.completion_lengths for path in paths]
    print()
    print(format_table(results))
    print(f"\n# wall {time.perf_counter() - started:.0f} s; load average before {load_before}, after {loadavg()}")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "load_before": load_before, "load_after": loadavg(),
                                         "args": {k: (str(v) if isinstance(v, Path) else v)
                                                  for k, v in vars(args).items()}}, indent=2))


if __name__ == "__main__":
    main()
