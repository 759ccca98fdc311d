"""Per-GPU memory estimate for GRPO on Qwen3-Omni-30B-A3B (the two recipes), printed as a table.

    python benchmarks/qwen3_omni_memory.py                       # G = 16, P = 1024, C = 768, 8 GPUs
    python benchmarks/qwen3_omni_memory.py --gpus 16 --completion 512

Parameters are counted exactly: the thinker is built on the meta device (no memory, no weights)
from the published Qwen3-Omni-30B-A3B thinker dimensions below (text hidden 2048 x 48 layers,
128 experts of width 768, top-8; vision 1152 x 27 with deepstack at 8/16/24; audio 1280 x 32).
Everything else is arithmetic, stated in the table's notes:

* weights bf16 (2 B/param); full fine-tuning keeps an fp32 master copy and two fp32 Adam moments
  (12 B/param) and bf16 gradients (2 B/param), all sharded 1/N under ZeRO-3; LoRA keeps the bf16
  base whole on every GPU (DDP) and fp32 adapters + their Adam states.
* rollouts gather the full bf16 thinker on every GPU under ZeRO-3 (`gathered_for_generation`), so
  that is a peak on top of the shards (gradients are freed then). KV cache at G completions of P + C tokens.
* activations with gradient checkpointing, for group_sharing: none (an upper bound: the shared paths
  compute the prompt once per group): each layer's input [G x (P + C), H] in bf16 kept for backward, plus one layer recomputed
  (its MoE intermediate [G x (P + C) x top_k, 2 x 768], attention by flash/sdpa without an L x L
  matrix), plus one [1024, vocab] fp32 logits chunk (log-probs are computed in chunks).
Estimates, not measurements: no GPU was available where this was written.
"""

from __future__ import annotations

import argparse

GiB = 1024 ** 3

# The published Qwen3-Omni-30B-A3B thinker (config.json's thinker_config), the fields that size it.
PUBLISHED_THINKER = {
    "text_config": {"vocab_size": 152064, "hidden_size": 2048, "num_hidden_layers": 48, "num_attention_heads": 32,
                    "num_key_value_heads": 4, "head_dim": 128, "intermediate_size": 768, "moe_intermediate_size": 768,
                    "num_experts": 128, "num_experts_per_tok": 8, "decoder_sparse_step": 1,
                    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [24, 20, 20],
                                        "interleaved": True, "mrope_interleaved": True}},
    "vision_config": {"depth": 27, "hidden_size": 1152, "num_heads": 16, "intermediate_size": 4304,
                      "out_hidden_size": 2048, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
                      "num_position_embeddings": 2304, "deepstack_visual_indexes": [8, 16, 24]},
    "audio_config": {"d_model": 1280, "encoder_layers": 32, "encoder_attention_heads": 20, "encoder_ffn_dim": 5120,
                     "output_dim": 2048, "downsample_hidden_size": 480, "n_window": 50, "num_mel_bins": 128},
    "vision_start_token_id": 151652,
}


def parameter_counts() -> dict[str, int]:
    """Exact parameter counts of the published thinker by part (built on the meta device)."""
    import torch
    from transformers import Qwen3OmniMoeThinkerConfig, Qwen3OmniMoeThinkerForConditionalGeneration

    with torch.device("meta"):
        model = Qwen3OmniMoeThinkerForConditionalGeneration(Qwen3OmniMoeThinkerConfig(**PUBLISHED_THINKER))
    counts = {"experts": 0, "attention": 0, "text other": 0, "vision": 0, "audio": 0}
    for name, param in model.named_parameters():
        if ".visual." in name:
            part = "vision"
        elif ".audio_tower." in name:
            part = "audio"
        elif ".mlp.experts." in name:
            part = "experts"
        elif ".self_attn." in name:
            part = "attention"
        else:  # embeddings, lm_head, norms, routers
            part = "text other"
        counts[part] += param.numel()
    counts["total"] = sum(counts.values())
    text = PUBLISHED_THINKER["text_config"]
    per_layer_expert = 3 * text["hidden_size"] * text["moe_intermediate_size"]
    counts["active per token"] = counts["total"] - counts["experts"] + (
        text["num_hidden_layers"] * text["num_experts_per_tok"] * per_layer_expert)
    return counts


def lora_parameters(rank: int) -> int:
    """LoRA A and B on q/k/v/o of every text layer (the attention-only default)."""
    text = PUBLISHED_THINKER["text_config"]
    h, q, kv = text["hidden_size"], text["num_attention_heads"] * text["head_dim"], \
        text["num_key_value_heads"] * text["head_dim"]
    per_layer = rank * ((h + q) + 2 * (h + kv) + (q + h))
    return per_layer * text["num_hidden_layers"]


def activation_bytes(generations: int, prompt: int, completion: int) -> dict[str, float]:
    text = PUBLISHED_THINKER["text_config"]
    tokens = generations * (prompt + completion)
    hidden, layers = text["hidden_size"], text["num_hidden_layers"]
    checkpoints = tokens * hidden * 2 * layers                                     # bf16 layer inputs
    moe = tokens * text["num_experts_per_tok"] * 2 * text["moe_intermediate_size"] * 2 * 3  # gate/up, act, down in
    attention = tokens * (text["num_attention_heads"] + 2 * text["num_key_value_heads"]) * text["head_dim"] * 2 * 3
    logits = 1024 * text["vocab_size"] * 4 * 3                                     # chunk, softmax, grad
    kv_cache = tokens * 2 * text["num_key_value_heads"] * text["head_dim"] * 2 * layers
    return {"checkpointed layer inputs": checkpoints, "one layer recomputed": moe + attention,
            "logits chunk": logits, "rollout KV cache": kv_cache}


def estimate(counts: dict[str, int], gpus: int, generations: int, prompt: int, completion: int,
             lora_rank: int) -> list[tuple[str, float, float]]:
    """Rows (item, full fine-tuning ZeRO-3 GiB, LoRA DDP GiB) per GPU."""
    total = counts["total"]
    act = activation_bytes(generations, prompt, completion)
    lora = lora_parameters(lora_rank)
    train_act = act["checkpointed layer inputs"] + act["one layer recomputed"] + act["logits chunk"]
    rows = [
        ("bf16 weights (sharded / whole)", total * 2 / gpus, total * 2),
        ("gradients (bf16, sharded / adapters fp32)", total * 2 / gpus, lora * 4),
        ("fp32 master + Adam moments (sharded / adapters)", total * 12 / gpus, lora * 12),
        ("activations, policy pass (checkpointing on)", train_act, train_act),
    ]
    rollout = [total * 2 + act["rollout KV cache"], act["rollout KV cache"]]
    rows.append(("rollout: full bf16 thinker gathered + KV cache", rollout[0], rollout[1]))
    # weights and optimizer states stay; gradients and policy activations exist only outside rollouts
    peak = [rows[0][i] + rows[2][i] + max(rows[1][i] + rows[3][i], rollout[i - 1]) for i in (1, 2)]
    rows.append(("peak: weights + optimizer + max(grads + activations, rollout)", *peak))
    return [(name, full / GiB, lora_ / GiB) for name, full, lora_ in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--generations", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=1024, help="prompt tokens P (media placeholders included)")
    parser.add_argument("--completion", type=int, default=768, help="completion tokens C")
    parser.add_argument("--lora-rank", type=int, default=64)
    args = parser.parse_args()

    counts = parameter_counts()
    print("Qwen3-Omni-30B-A3B thinker parameters (exact, published dimensions)")
    for part, n in counts.items():
        print(f"  {part:<18} {n / 1e9:7.3f} B  ({n / counts['total']:6.1%})")
    print(f"  LoRA r={args.lora_rank} on attention: {lora_parameters(args.lora_rank) / 1e6:.1f} M")
    print()
    print(f"Per-GPU memory estimate, GiB: {args.gpus} GPUs, G = {args.generations}, P = {args.prompt}, "
          f"C = {args.completion}, group_sharing: none")
    print(f"  {'item':<62} {'full FT ZeRO-3':>15} {'LoRA DDP':>10} {'ratio':>7}")
    for name, full, lora in estimate(counts, args.gpus, args.generations, args.prompt, args.completion,
                                     args.lora_rank):
        ratio = f"{lora / full:6.2f}x" if full else ""
        print(f"  {name:<62} {full:15.1f} {lora:10.1f} {ratio:>7}")
    for name, value in activation_bytes(args.generations, args.prompt, args.completion).items():
        print(f"  (activations) {name:<48} {value / GiB:15.1f}")


if __name__ == "__main__":
    main()
