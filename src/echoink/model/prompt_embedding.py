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

`attention_implementation` / `masked_attention` switch the language model's attention function for
the duration of a call (checkpoint replays included); the group-sharing paths use them.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from echoink.compat import attention_implementation_of, attention_implementation_set, checkpoint_functions_wrapped
from echoink.model.inputs import PromptInputs


@dataclass(frozen=True)
class Deepstack:
    """A prompt's deepstack inputs (Qwen3-Omni): vision-encoder features the language model adds to the
    hidden states of its first layers at the visual positions.

    mask:   [1, P] bool, the image and video placeholder positions of the prompt
    embeds: one [N, H] tensor per deepstack layer, N = mask.sum(), in position order
    """

    mask: torch.Tensor
    embeds: tuple[torch.Tensor, ...]

    def language_model_kwargs(self, copies: int = 1, length: int | None = None) -> dict:
        """`visual_pos_masks` / `deepstack_visual_embeds` for `copies` rows of `length` (>= P) positions each,
        the prompt first in every row: mask [copies, length], embeds [copies * N, H] (row-major, as the mask)."""
        mask = self.mask
        if length is not None and length > mask.shape[1]:
            mask = F.pad(mask, (0, length - mask.shape[1]), value=False)
        return {"visual_pos_masks": mask.expand(copies, -1),
                "deepstack_visual_embeds": [e.repeat(copies, 1) for e in self.embeds]}


def embed_prompt(model, prompt: PromptInputs) -> torch.Tensor:
    """-> [1, P, H] prompt embeddings with audio/image/video features scattered in (with grad if enabled)."""
    return embed_prompt_with_deepstack(model, prompt)[0]


def embed_prompt_with_deepstack(model, prompt: PromptInputs) -> tuple[torch.Tensor, Deepstack | None]:
    """-> ([1, P, H] prompt embeddings, the prompt's deepstack inputs or None when the model has none / no visuals).

    The encoders run once; the deepstack features come from the same vision-encoder call.
    """
    thinker = model.model
    ids = prompt.input_ids
    embeds = thinker.get_input_embeddings()(ids)
    media = prompt.media
    visual: list[tuple[torch.Tensor, list[torch.Tensor]]] = []  # (placeholder mask [1, P], per-layer features)
    if "input_features" in media:
        with _grad_if_trainable(thinker.audio_tower):
            audio = thinker.get_audio_features(media["input_features"], media["feature_attention_mask"],
                                               return_dict=True).last_hidden_state
        embeds = _scatter(embeds, ids == model.config.audio_token_id, audio)
    if "pixel_values" in media:
        with _grad_if_trainable(thinker.visual):
            image = thinker.get_image_features(media["pixel_values"], media["image_grid_thw"], return_dict=True)
        mask = ids == model.config.image_token_id
        embeds = _scatter(embeds, mask, torch.cat(image.pooler_output, dim=0))
        visual.append((mask, _layer_features(image)))
    if "pixel_values_videos" in media:
        with _grad_if_trainable(thinker.visual):
            video = thinker.get_video_features(media["pixel_values_videos"], media["video_grid_thw"], return_dict=True)
        mask = ids == model.config.video_token_id
        embeds = _scatter(embeds, mask, torch.cat(video.pooler_output, dim=0))
        visual.append((mask, _layer_features(video)))
    return embeds, _deepstack(visual, embeds)


def _layer_features(output) -> list[torch.Tensor]:
    """The per-deepstack-layer features of an image/video encoder output ([] when the encoder has none)."""
    return [torch.cat(feature, dim=0) for feature in (getattr(output, "deepstack_features", None) or [])]


def _deepstack(visual: list[tuple[torch.Tensor, list[torch.Tensor]]], embeds: torch.Tensor) -> Deepstack | None:
    """Join image and video deepstack features in position order (as the thinker's forward does)."""
    visual = [(mask, features) for mask, features in visual if features]
    if not visual:
        return None
    joint_mask = visual[0][0]
    for mask, _ in visual[1:]:
        joint_mask = joint_mask | mask
    layers = []
    for layer in range(len(visual[0][1])):
        joint = embeds.new_zeros(int(joint_mask.sum()), embeds.shape[-1])                  # [N, H]
        for mask, features in visual:
            joint = joint.masked_scatter(mask[joint_mask].unsqueeze(-1), features[layer].to(joint.dtype))
        layers.append(joint)
    return Deepstack(mask=joint_mask, embeds=tuple(layers))


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


@contextmanager
def attention_implementation(language_model, name: str):
    """Run the language model's attention through the registered function `name` for a while.

    The attention modules look their function up in the (text) config at every call; this swaps
    the name there and puts the previous one back, also on error. Gradient checkpointing replays
    a layer's forward during backward, after this context has ended: the checkpoint function of
    each checkpointed layer is wrapped meanwhile, so that the replay runs under `name` too (a
    replay under another implementation would not match the forward).
    """
    with checkpoint_functions_wrapped(language_model.layers,
                                      lambda original: _replays_under(original, language_model.config, name)):
        with attention_implementation_set(language_model.config, name):
            yield


def _replays_under(checkpoint_function, config, name: str):
    """A checkpoint function whose checkpointed function (forward and replay) runs under `name`."""
    def checkpointed(function, *args, **kwargs):
        def under_name(*inner_args, **inner_kwargs):
            with attention_implementation_set(config, name):
                return function(*inner_args, **inner_kwargs)
        return checkpoint_function(under_name, *args, **kwargs)
    return checkpointed


GQA_SDPA = "echoink_sdpa_gqa"


def _sdpa_gqa_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """sdpa that shares key/value heads natively (`enable_gqa`) even with an explicit mask.

    transformers' sdpa path copies K/V once per query head (`repeat_kv`) whenever there is a mask,
    because CUDA's masked kernels lack GQA. PyTorch's CPU flash kernel has it: same result, without
    the [G, heads, P + C, d] copies in forward and their gradients in backward. Needs an explicit
    mask (is_causal is not inferred); on other devices this is transformers' sdpa.
    """
    if query.device.type != "cpu":
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                         scale=scaling, enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(GQA_SDPA, _sdpa_gqa_forward)


def require_full_attention(language_model) -> None:
    """The shared paths build their own masks, which know nothing of sliding windows."""
    if getattr(language_model, "has_sliding_layers", False):
        raise ValueError("group_sharing: full does not support sliding-window attention layers "
                         "(Qwen2.5-Omni has none); set group_sharing: none for this model")


def masked_attention(language_model):
    """Context for forwards that pass an explicit 4-D mask: GQA-native sdpa when the model uses sdpa."""
    if attention_implementation_of(language_model.config) == "sdpa":
        return attention_implementation(language_model, GQA_SDPA)
    return nullcontext()
