"""A short supervised warm-up that teaches the answer FORMAT, not the answers.

A random-initialised model never emits `<think>…</think><answer>X</answer>`, so every GRPO reward
would be zero and no group would have any signal. The warm-up trains on

    <think>ok</think><answer>L</answer>  and the family's end-of-turn token

where L is a letter drawn uniformly at random, independently of the question. The model learns the
format and a roughly uniform letter distribution; it learns nothing about which letter is right
(its accuracy stays at chance — the demo measures it). For other problem types (counting, spans, ...)
L is the answer of a random record of the same problem type, again independent of the question: the
model learns the answer's form and the answers' overall distribution, not which answer is right. Real models (Qwen2.5-Omni-7B) need no warm-up.
"""

from __future__ import annotations

import random
import time

import torch

from echoink.grpo.logprobs import group_token_logps
from echoink.model.engine import Group
from echoink.model.generation import completion_mask
from echoink.model.families import family_of_model
from echoink.model.inputs import MediaOptions, encode_prompt
from echoink.prompts import DEFAULT_TEMPLATE, PromptTemplate

WARMUP_THINK = "ok"


def warmup_target(letter: str) -> str:
    return f"<think>{WARMUP_THINK}</think><answer>{letter}</answer>"


def format_warmup(model, processor, records, steps: int = 100, batch_size: int = 8, learning_rate: float = 1e-3,
                  seed: int = 0, media_options: MediaOptions = MediaOptions(), template: PromptTemplate = DEFAULT_TEMPLATE,
                  log=print) -> dict:
    """Train `model` in place for `steps` steps of `batch_size` prompts with random-letter targets."""
    rng = random.Random(seed)
    tokenizer = processor.tokenizer
    eos_id = family_of_model(model).eos_id(tokenizer)
    prompts = {}  # encode each record once
    answers_by_type: dict[str, list[str]] = {}
    for record in records:
        answers_by_type.setdefault(record.problem_type, []).append(record.answer)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate,
                                  weight_decay=0.0)
    model.train()
    start, losses = time.perf_counter(), []
    for step in range(steps):
        groups = []
        for record in rng.sample(records, min(batch_size, len(records))):
            if record.problem_id not in prompts:
                prompts[record.problem_id] = encode_prompt(record, processor, media_options, template)
            answer = (rng.choice(record.option_letters) if record.is_multiple_choice
                      else rng.choice(answers_by_type[record.problem_type]))
            ids = tokenizer(warmup_target(answer), add_special_tokens=False, return_tensors="pt")["input_ids"]
            ids = torch.cat([ids, torch.tensor([[eos_id]])], dim=1)                       # [1, C]
            mask, truncated = completion_mask(ids, eos_id)
            groups.append(Group(prompt=prompts[record.problem_id], completion_ids=ids, completion_mask=mask,
                                texts=[], truncated=truncated))
        logps = group_token_logps(model, groups, sharing="full")
        loss = -torch.stack([lp.mean() for lp in logps]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if log and (step + 1) % max(1, steps // 5) == 0:
            log(f"  format warm-up step {step + 1}/{steps}: loss {loss.item():.3f}")
    model.eval()
    return {"steps": steps, "final_loss": losses[-1] if losses else None, "seconds": time.perf_counter() - start}
