"""A prompt's input embeddings and M-RoPE positions, computed once per prompt.

`embed_prompt` runs the audio and vision encoders on the prompt's media ONCE and scatters their
outputs into the token embeddings at the placeholder positions — what the thinker's own forward
does, but exposed so that the G completions of a group can reuse the result (and, when the
encoders are trainable, their gradient arrives once, summed over the group). A frozen encoder
(no parameter requires grad, LoRA adapters included) runs under `torch.no_grad()`: nothing of it
is kept for backward even when a hook such as `enable_input_require_grads` marks its input
embeddings as requiring grad.

`prompt_positions` gives the 3-D (temporal, height, width) rotary positions of the prompt.
Completion token t then sits at `max(prompt positions) + 1 + t` on all three axes. Positions are
always passed explicitly: the thinker keeps `rope_deltas` as state between forwards, which must
not leak from one prompt into another.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from echoink.grpo.types import PromptInputs


def embed_prompt(model, prompt: PromptInputs) -> torch.Tensor:
    """-> [1, P, H] prompt embeddings with audio/image/video features scattered in (with grad if enabled)."""
    thinker = model.model
    ids = prompt.input_ids
    embeds = thinker.get_input_embeddings()(ids)
    media = prompt.media
    if "input_features" in media:
        with _grad_if_trainable(thinker.audio_tower):
            audio = thinker.get_audio_features(media["input_features"], media["feature_attention_mask"],
                                               return_dict=True).last_hidden_state
        embeds = _scatter(embeds, ids == model.config.audio_token_id, audio)
    if "pixel_values" in media:
        with _grad_if_trainable(thinker.visual):
            image = thinker.get_image_features(media["pixel_values"], media["image_grid_thw"], return_dict=True)
        embeds = _scatter(embeds, ids == model.config.image_token_id, torch.cat(image.pooler_output, dim=0))
    if "pixel_values_videos" in media:
        with _grad_if_trainable(thinker.visual):
            video = thinker.get_video_features(media["pixel_values_videos"], media["video_grid_thw"], return_dict=True)
        embeds = _scatter(embeds, ids == model.config.video_token_id, torch.cat(video.pooler_output, dim=0))
    return embeds


def _grad_if_trainable(encoder: nn.Module):
    """no_grad() for an encoder none of whose parameters requires grad, else a no-op context."""
    return nullcontext() if any(p.requires_grad for p in encoder.parameters()) else torch.no_grad()


def _scatter(embeds: torch.Tensor, mask: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Put `features` [N, H] at the N positions where `mask` [1, P] is True."""
    count = int(mask.sum())
    if count != features.shape[0]:
        raise ValueError(f"prompt has {count} placeholder tokens but the encoder produced {features.shape[0]} features")
    return embeds.masked_scatter(mask.unsqueeze(-1), features.to(embeds.device, embeds.dtype))


def prompt_positions(model, prompt: PromptInputs) -> torch.Tensor:
    """-> [3, 1, P] M-RoPE position ids of the prompt (text, audio, image and video tokens)."""
    media = prompt.media
    audio_lengths = media["feature_attention_mask"].sum(-1) if "feature_attention_mask" in media else None
    positions, _ = model.model.get_rope_index(
        prompt.input_ids,
        media.get("image_grid_thw"),
        media.get("video_grid_thw"),
        torch.ones_like(prompt.input_ids),
        prompt.use_audio_in_video,
        audio_lengths,
        media.get("video_second_per_grid"),
    )
    return positions


def completion_positions(prompt_pos: torch.Tensor, length: int) -> torch.Tensor:
    """[3, 1, P] prompt positions -> [3, 1, length] positions of completion tokens 0..length-1."""
    start = prompt_pos.max() + 1
    return (start + torch.arange(length, device=prompt_pos.device)).view(1, 1, -1).expand(3, 1, -1)
