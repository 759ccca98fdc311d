"""Data types of a GRPO step. The group — one prompt, its media, its G completions — is the unit.

Shapes: P = prompt length, G = completions per prompt, C = longest completion in the group.
A prompt's multimodal tensors are stored once (`PromptInputs`), never repeated G times; only the
code that talks to the model (`rollout`, `logprobs`) decides how to expand them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

# Processor outputs that belong to the media of one prompt (everything but the token ids).
MEDIA_KEYS = (
    "input_features",          # [1, 128, 3000]    log-mel features of the prompt's audio (padded to 30 s)
    "feature_attention_mask",  # [1, 3000]         which feature frames are real audio
    "pixel_values",            # [N_patches, 1176] the image's flattened 14x14x2 patches
    "image_grid_thw",          # [1, 3]            (1, H/14, W/14)
    "pixel_values_videos",     # [N_patches, 1176]
    "video_grid_thw",          # [1, 3]            (F/2, H/14, W/14)
    "video_second_per_grid",   # [1]               seconds per temporal patch
)


@dataclass
class PromptInputs:
    """The processor's output for ONE prompt.

    input_ids: [1, P] token ids, multimodal placeholders expanded (one `<|AUDIO|>` per audio token ...)
    media:     the `MEDIA_KEYS` present for this prompt (tensors, stored once)
    use_audio_in_video: the video's own audio track is interleaved with its frames
    """

    input_ids: torch.Tensor
    media: dict[str, torch.Tensor] = field(default_factory=dict)
    use_audio_in_video: bool = False
    problem_id: Any = None

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[1])

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for one forward/generate call of the thinker on this prompt alone."""
        kwargs: dict[str, Any] = {"input_ids": self.input_ids, "attention_mask": torch.ones_like(self.input_ids)}
        kwargs.update(self.media)
        if self.use_audio_in_video:
            kwargs["use_audio_in_video"] = True
        return kwargs

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "PromptInputs":
        """Move to `device`; floating media tensors (features, pixels) are cast to `dtype` when given."""
        def move(t: torch.Tensor) -> torch.Tensor:
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device)

        return replace(self, input_ids=self.input_ids.to(device), media={k: move(v) for k, v in self.media.items()})


@dataclass
class Group:
    """One prompt and its G sampled completions.

    completion_ids:  [G, C] sampled tokens, right-padded with the pad id
    completion_mask: [G, C] 1 for tokens up to and including the first EOS, 0 after
    texts:           G decoded completions (special tokens removed)
    truncated:       [G] bool, True where no EOS was produced within max_completion_length
    rewards:         [G, R] one column per reward function (set after scoring)
    advantages:      [G] group-normalised advantages (set after scoring)
    old_logps / ref_logps: [G, C] per-token log-probs of the sampling policy / reference (when needed)
    """

    prompt: PromptInputs
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    texts: list[str]
    truncated: torch.Tensor
    record: Any = None
    rewards: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    old_logps: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return int(self.completion_ids.shape[0])

    @property
    def completion_lengths(self) -> torch.Tensor:
        """[G] number of completion tokens (including the EOS)."""
        return self.completion_mask.sum(dim=1)
