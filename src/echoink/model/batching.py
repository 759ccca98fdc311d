"""Batch several prompts into one set of thinker keyword arguments (left padding, media concatenated).

    [PromptInputs (input_ids [1, P_i], media of prompt i)] ──collate_prompts──▶ one kwargs dict:

    input_ids               [B, P]   P = max P_i; prompt i right-aligned, pad_id on its left
    attention_mask          [B, P]   0 on the left padding, 1 on the prompt
    input_features          [A, 128, T]  every prompt's audios in prompt order (T = longest; zero-padded)
    feature_attention_mask  [A, T]       which feature frames are real (0 on the padding)
    pixel_values            [N, 1176]    every prompt's image patches in prompt order
    image_grid_thw          [I, 3]
    pixel_values_videos     [M, 1176]
    video_grid_thw          [V, 3]
    video_second_per_grid   [V]
    use_audio_in_video      True when the prompts read their video's own audio track (key absent otherwise)

Why left padding is exact for Qwen2.5-Omni: the thinker matches placeholders to media features in
order over the whole batch (the i-th image's patches fill the i-th run of `<|IMAGE|>` tokens), and
`get_rope_index` computes each row's M-RoPE positions from the tokens where `attention_mask == 1`
only, so a padded row gets the positions of the prompt alone and its `rope_delta` is taken relative
to the unpadded length. Decoding steps then continue at `cumsum(attention_mask) - 1 + rope_delta`.
Pad slots are masked out of attention. Batched greedy decoding therefore reproduces batch size 1
(tests/test_eval_run.py checks it on prompts of different lengths and media).

`use_audio_in_video` is one flag per forward call, so a batch must not mix prompts with and without
it: :func:`split_by_audio_in_video` groups them first.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from echoink.model.inputs import MEDIA_KEYS, PromptInputs

#: Floating media tensors that take the model's dtype (the rest stay as the processor made them).
FLOAT_MEDIA_KEYS = ("input_features", "pixel_values", "pixel_values_videos")


def split_by_audio_in_video(prompts: Sequence[PromptInputs]) -> list[list[int]]:
    """Indices of `prompts` grouped by their `use_audio_in_video` flag (order kept inside a group).

    Returns at most two lists, the group of the first prompt first; empty groups are left out.
    """
    groups: dict[bool, list[int]] = {}
    for index, prompt in enumerate(prompts):
        groups.setdefault(bool(prompt.use_audio_in_video), []).append(index)
    return list(groups.values())


def collate_prompts(prompts: Sequence[PromptInputs], pad_id: int, repeats: int = 1) -> dict[str, Any]:
    """Left-pad and concatenate B prompts into one kwargs dict for `model(**kw)` / `model.generate(**kw)`.

    prompts: B prompts that all share one `use_audio_in_video` flag (ValueError otherwise).
    pad_id:  token id put on the left of shorter prompts (masked out by `attention_mask`).
    repeats: each prompt appears `repeats` times in a row (rows [p0, p0, ..., p1, p1, ...]), its media
             repeated with it; 1 leaves the batch as is. (`generate(num_return_sequences=K)` does
             the same expansion itself; this is for callers that want the rows explicitly.)
    Returns the dict described in the module docstring; tensors stay on the prompts' device.
    """
    if not prompts:
        raise ValueError("collate_prompts needs at least one prompt")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    flags = {bool(p.use_audio_in_video) for p in prompts}
    if len(flags) > 1:
        raise ValueError("a batch mixes prompts with and without use_audio_in_video (one flag per forward call); "
                         "group them with split_by_audio_in_video first")
    rows = [p for p in prompts for _ in range(repeats)]
    input_ids, attention_mask = _left_pad([p.input_ids for p in rows], pad_id)
    batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
    batch.update(_concat_media([p.media for p in rows]))
    if flags.pop():
        batch["use_audio_in_video"] = True
    return batch


def embedding_device_dtype(model) -> tuple[torch.device, torch.dtype]:
    """Where the token embeddings live and their dtype (media tensors follow them; LoRA adapters may differ)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    parameter = embeddings.weight if embeddings is not None else next(model.parameters())
    return parameter.device, parameter.dtype


def move_prompt(prompt: PromptInputs, device: torch.device | str, dtype: torch.dtype | None = None) -> PromptInputs:
    """`prompt` on `device`; its `FLOAT_MEDIA_KEYS` tensors cast to `dtype` when given (the rest keep their dtype)."""
    def move(key: str, value: torch.Tensor) -> torch.Tensor:
        if dtype is not None and key in FLOAT_MEDIA_KEYS:
            return value.to(device=device, dtype=dtype)
        return value.to(device)

    return replace(prompt, input_ids=prompt.input_ids.to(device),
                   media={key: move(key, value) for key, value in prompt.media.items()})


def _left_pad(sequences: Sequence[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[1, P_i] id tensors -> (ids [B, P], mask [B, P]) right-aligned, padded on the left."""
    for ids in sequences:
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise ValueError(f"each prompt's input_ids must have shape [1, P], got {tuple(ids.shape)}")
    length = max(int(ids.shape[1]) for ids in sequences)
    first = sequences[0]
    input_ids = torch.full((len(sequences), length), pad_id, dtype=first.dtype, device=first.device)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long, device=first.device)
    for row, ids in enumerate(sequences):
        start = length - int(ids.shape[1])
        input_ids[row, start:] = ids[0]
        attention_mask[row, start:] = 1
    return input_ids, attention_mask


def _concat_media(media: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate each media key along dim 0 in prompt order; audio features are zero-padded in time."""
    out: dict[str, torch.Tensor] = {}
    for key in MEDIA_KEYS:
        parts = [m[key] for m in media if key in m]
        if not parts:
            continue
        if key in ("input_features", "feature_attention_mask"):
            frames = max(int(t.shape[-1]) for t in parts)
            parts = [F.pad(t, (0, frames - int(t.shape[-1]))) for t in parts]
        out[key] = torch.cat(parts, dim=0)
    if ("input_features" in out) != ("feature_attention_mask" in out):
        raise ValueError("input_features and feature_attention_mask must come together")
    return out
