"""The forward of Qwen-shaped omni thinkers (Qwen2.5-Omni, Qwen3-Omni): `QwenThinker`, the base of both
family classes, implements `OmniFamily`'s forward methods; nothing outside `model/families/` touches
what is here.

The thinker `model` is a `*ThinkerForConditionalGeneration`: `model.model` holds the encoders
(`audio_tower`, `visual`) and the text model (`model.model.language_model`), `model.lm_head` the
output head. Positions are 3-D M-RoPE ids (temporal, height, width) [3, B, T]; a completion token t
after a prompt sits at `max(prompt positions) + 1 + t` on all three axes. Positions are always passed
explicitly: the thinker keeps `rope_deltas` as state between forwards, which must not leak from one
prompt into another (`generate` and the repeated forward clear it).

`embed_prompt` runs the audio and vision encoders on the prompt's media ONCE and scatters their
outputs into the token embeddings at the placeholder positions — what the thinker's own forward
does, but exposed so that the G completions of a group can reuse the result (and, when the
encoders are trainable, their gradient arrives once, summed over the group). A frozen encoder
(no parameter requires grad, LoRA adapters included) runs under `torch.no_grad()`: nothing of it
is kept for backward even when a hook such as `enable_input_require_grads` marks its input
embeddings as requiring grad. Qwen3-Omni's vision encoder also hands per-layer "deepstack" features
to the first decoder layers at the visual positions (`Deepstack`, the prompt's `extras`):
`run_decoder` passes them on for every row that begins with the prompt.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from echoink.model.families.base import DecoderOutput, EmbeddedPrompt, OmniFamily
from echoink.model.generation import own_generation_defaults
from echoink.model.inputs import PromptInputs

#: Tokenizer attributes naming the multimodal placeholder and boundary tokens (never sampled).
MEDIA_TOKEN_ATTRIBUTES = ("audio_token", "image_token", "video_token", "audio_bos_token", "audio_eos_token",
                          "vision_bos_token", "vision_eos_token")
#: Thinker-only names -> published full-layout names (first matching prefix; then `thinker.` in front).
PUBLISHED_PREFIXES = (("model.language_model.", "model."), ("model.audio_tower.", "audio_tower."),
                      ("model.visual.", "visual."))
#: Media tensors with one row per item (repeated whole for G copies of a prompt); the rest are patch rows.
PER_ITEM_MEDIA = ("input_features", "feature_attention_mask", "image_grid_thw", "video_grid_thw",
                  "video_second_per_grid")


class QwenThinker(OmniFamily):
    """`OmniFamily`'s forward for Qwen-shaped thinkers (see the module docstring)."""

    end_of_turn_token = "<|im_end|>"

    def published_thinker_name(self, name: str) -> str:
        for current, published in PUBLISHED_PREFIXES:
            if name.startswith(current):
                name = published + name[len(current):]
                break
        return f"thinker.{name}"

    def media_token_ids(self, tokenizer) -> list[int]:
        ids = {tokenizer.convert_tokens_to_ids(getattr(tokenizer, attr)) for attr in MEDIA_TOKEN_ATTRIBUTES
               if getattr(tokenizer, attr, None)}
        ids.update(tokenizer.convert_tokens_to_ids(t) for t in ("<|vision_pad|>",) if t in tokenizer.get_vocab())
        return sorted(i for i in ids if i is not None and i >= 0)

    def embed_prompt(self, model, prompt: PromptInputs) -> EmbeddedPrompt:
        embeds, deepstack = _embed_prompt(model, prompt)
        return EmbeddedPrompt(embeds=embeds, positions=_prompt_positions(model, prompt), extras=deepstack)

    def stack_prompts(self, prompts: Sequence[EmbeddedPrompt]) -> EmbeddedPrompt:
        lengths = {prompt.length for prompt in prompts}
        if len(lengths) != 1:
            raise ValueError(f"stack_prompts: prompts of one length only, got lengths {sorted(lengths)}")
        return EmbeddedPrompt(embeds=torch.cat([prompt.embeds for prompt in prompts]),                # [n, P, H]
                              positions=torch.cat([prompt.positions for prompt in prompts], dim=1),  # [3, n, P]
                              extras=Deepstack.stack([prompt.extras for prompt in prompts]))

    def embed_tokens(self, model, ids: torch.Tensor) -> torch.Tensor:
        return model.get_input_embeddings()(ids)

    def positions_after_prompt(self, prompt: EmbeddedPrompt, start, length: int, rows: int = 1) -> torch.Tensor:
        """-> [3, rows, length] positions of the tokens start .. start + length - 1 after the prompt."""
        first = prompt.positions.max() + 1 + start
        return (first + torch.arange(length, device=prompt.positions.device)).view(1, 1, -1).expand(3, rows, -1)

    def run_decoder(self, model, embeds, positions, *, prompt=None, cache=None, use_cache=False,
                    attention_mask=None, **attention_kwargs) -> DecoderOutput:
        kwargs: dict[str, Any] = dict(attention_kwargs)
        if prompt is not None and prompt.extras is not None:
            kwargs.update(prompt.extras.language_model_kwargs(embeds.shape[0], embeds.shape[1]))
        if cache is not None:
            kwargs["past_key_values"] = cache
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        out = model.model.language_model(inputs_embeds=embeds, position_ids=positions, use_cache=use_cache, **kwargs)
        return DecoderOutput(hidden=out.last_hidden_state, cache=out.past_key_values)

    def output_head(self, model) -> nn.Module:
        return model.lm_head

    def decoder(self, model) -> nn.Module:
        return model.model.language_model

    def forward_repeated(self, model, prompt: PromptInputs, completion_ids: torch.Tensor,
                         router_logits: bool = False) -> tuple[torch.Tensor, Any]:
        g = completion_ids.shape[0]
        ids = torch.cat([prompt.input_ids.expand(g, -1), completion_ids], dim=1)              # [G, P + C]
        router = {"output_router_logits": True} if router_logits else {}
        out = model.model(input_ids=ids, attention_mask=torch.ones_like(ids),
                          use_audio_in_video=prompt.use_audio_in_video, use_cache=False,
                          **_repeat_media(prompt.media, g), **router)
        model.model.rope_deltas = None  # state the thinker keeps between forwards; don't let it leak
        return out.last_hidden_state, (out.router_logits if router_logits else None)

    def generate(self, model, batch: dict[str, Any], generation_config) -> torch.Tensor:
        with own_generation_defaults(model):  # our settings only, never the checkpoint's sampling defaults
            sequences = model.generate(**batch, generation_config=generation_config)
        _forget_rope_deltas(model)
        return sequences


def _repeat_media(media: dict[str, torch.Tensor], g: int) -> dict[str, torch.Tensor]:
    """Media of one prompt repeated for G identical prompts (what the repeated forward feeds the thinker)."""
    repeated = {}
    for key, value in media.items():
        if key in PER_ITEM_MEDIA:
            repeated[key] = value.repeat(g, *([1] * (value.dim() - 1)))
        else:  # pixel_values / pixel_values_videos: patches of all images are concatenated
            repeated[key] = value.repeat(g, 1)
    return repeated


def _forget_rope_deltas(model) -> None:
    """`generate` leaves per-batch M-RoPE deltas on the thinker; clear them (also under a PEFT wrapper)."""
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    inner = getattr(base, "model", None)
    if inner is not None and hasattr(inner, "rope_deltas"):
        inner.rope_deltas = None


@dataclass(frozen=True)
class Deepstack:
    """A prompt's deepstack inputs (Qwen3-Omni): vision-encoder features the language model adds to the
    hidden states of its first layers at the visual positions.

    mask:   [1, P] bool, the image and video placeholder positions of the prompt ([n, P] for n stacked prompts)
    embeds: one [N, H] tensor per deepstack layer, N = mask.sum(), in position order (row-major over the rows)
    """

    mask: torch.Tensor
    embeds: tuple[torch.Tensor, ...]

    def language_model_kwargs(self, copies: int = 1, length: int | None = None) -> dict:
        """`visual_pos_masks` / `deepstack_visual_embeds` for `copies` rows of `length` (>= P) positions each,
        the prompt(s) first in every row: mask [copies, length], embeds [copies * N, H] (row-major, as the mask).
        A stack of n prompts fills n rows (copies = n): each row its own prompt."""
        mask = self.mask
        if length is not None and length > mask.shape[1]:
            mask = F.pad(mask, (0, length - mask.shape[1]), value=False)
        if copies % mask.shape[0]:
            raise ValueError(f"deepstack inputs of {mask.shape[0]} stacked prompts cannot fill {copies} rows")
        repeats = copies // mask.shape[0]
        return {"visual_pos_masks": mask.repeat(repeats, 1),
                "deepstack_visual_embeds": [e.repeat(repeats, 1) for e in self.embeds]}

    @staticmethod
    def stack(extras: Sequence["Deepstack | None"]) -> "Deepstack | None":
        """The deepstack inputs of prompts of one length stacked as rows (a prompt without any: no positions)."""
        present = [e for e in extras if e is not None]
        if not present:
            return None
        masks = [e.mask if e is not None else torch.zeros_like(present[0].mask) for e in extras]
        layers = tuple(torch.cat([e.embeds[layer] for e in present]) for layer in range(len(present[0].embeds)))
        return Deepstack(mask=torch.cat(masks), embeds=layers)


def _embed_prompt(model, prompt: PromptInputs) -> tuple[torch.Tensor, Deepstack | None]:
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
    for pixels, grid, token_id, encode in (
            ("pixel_values", "image_grid_thw", model.config.image_token_id, thinker.get_image_features),
            ("pixel_values_videos", "video_grid_thw", model.config.video_token_id, thinker.get_video_features)):
        if pixels in media:  # images, then videos (the thinker's own order)
            with _grad_if_trainable(thinker.visual):
                features = encode(media[pixels], media[grid], return_dict=True)
            mask = ids == token_id
            embeds = _scatter(embeds, mask, torch.cat(features.pooler_output, dim=0))
            visual.append((mask, _layer_features(features)))
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


def _prompt_positions(model, prompt: PromptInputs) -> torch.Tensor:
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


