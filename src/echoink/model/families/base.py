"""The interface every omni model family implements (`OmniFamily`), and what its forward hands around.

A family owns everything about its thinker's insides. Code outside `model/families/` (the rest of the
model layer, grpo/, eval/, the demo) asks the family and never names a thinker attribute, a processor's
media keys or a chat-template token. The interface, by concern:

identity and files
    name, display_name, full_model_type, thinker_model_type, thinker_config_class, thinker_class,
    processor_class, other_parts, full_key_mapping (published names -> ours, for loading),
    published_thinker_name(name) (ours -> published, for export and the tiny builders),
    thinker_config_from_full(raw)
tokens
    end_of_turn_token (ends a reply), eos_id(tokenizer), media_token_ids(tokenizer) (never sampled)
the forward (all take the thinker `model`; shapes: P prompt, C completion, G rows, H hidden)
    embed_prompt(model, prompt) -> EmbeddedPrompt          encoders once; embeddings, positions, extras
    stack_prompts(prompts) -> EmbeddedPrompt               prompts of one length as the rows of one batch
    embed_tokens(model, ids [B, T]) -> [B, T, H]
    positions_after_prompt(prompt, start, length, rows) -> positions of tokens start.. after the prompt
    run_decoder(model, embeds [B, T, H], positions, prompt=, cache=, use_cache=, attention_mask=, **attention)
        -> DecoderOutput(hidden [B, T, H], cache)       the language model; with `prompt`, each row begins
                                                         with that prompt (its extras, e.g. deepstack, go in)
    output_head(model) -> module mapping [.., H] to [.., V] logits
    decoder(model) -> the language-model module (attention switching, checkpoint flags: model layer only)
    forward_repeated(model, prompt, completion_ids [G, C], router_logits) -> (hidden [G, P + C, H], logits)
        the thinker's own forward on G copies of [prompt, completion]
    generate(model, batch, generation_config) -> sequences [B * K, P + C]   transformers' generate, guarded
training
    lora_linears, lora_expert_parameters, mixture_of_experts, router_aux_loss(model, router_logits, mask),
    supports_group_sharing / require_group_sharing(sharing)

`families/qwen_thinker.py` implements the forward for Qwen-shaped thinkers (both current families).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from echoink.model.inputs import PromptInputs


class UnsupportedModelError(ValueError):
    """A checkpoint whose model_type no family knows, or a feature a family does not support (one line)."""


@dataclass(frozen=True)
class EmbeddedPrompt:
    """One prompt after the encoders: what the decoder needs to run it, or completions after it.

    embeds:    [1, P, H] token embeddings with the media features in place
    positions: the family's position ids of the prompt (Qwen: M-RoPE [3, 1, P])
    extras:    family-specific inputs that go with the prompt's positions (Qwen3-Omni: deepstack), or None
    """

    embeds: torch.Tensor
    positions: torch.Tensor
    extras: Any = None

    @property
    def length(self) -> int:
        return int(self.embeds.shape[1])


@dataclass(frozen=True)
class DecoderOutput:
    """hidden: [B, T, H] last hidden states; cache: the K/V cache after the call (None without one)."""

    hidden: torch.Tensor
    cache: Any = None


class OmniFamily(ABC):
    """One omni model family (see the module docstring). Subclasses set the class attributes and implement
    the forward methods."""

    name: str
    display_name: str
    full_model_type: str
    thinker_model_type: str
    thinker_config_class: type
    thinker_class: type
    processor_class: type
    other_parts: tuple[str, ...]
    full_key_mapping: dict[str, str] | None = None
    vision_patch_size: int
    supports_group_sharing: bool = True
    deepstack: bool = False
    mixture_of_experts: bool = False
    #: LoRA target patterns (regexes over module names) for "language_model", "vision", "audio".
    lora_linears: dict[str, str]
    #: LoRA on the language model's experts (None: not offered for this family).
    lora_expert_parameters: tuple[str, ...] | None = None
    #: The chat-template token that ends a reply (generation stops there).
    end_of_turn_token: str

    def thinker_config_from_full(self, raw: dict[str, Any]):
        """The thinker config inside a published full-layout config.json (`raw` is its JSON)."""
        thinker = dict(raw["thinker_config"])
        thinker.pop("model_type", None)
        return self.thinker_config_class(**thinker)

    def require_group_sharing(self, sharing: str) -> None:
        """Refuse a `group_sharing` other than "none" for a family whose shared paths are not exact (yet)."""
        if sharing != "none" and not self.supports_group_sharing:
            raise UnsupportedModelError(
                f"group_sharing: {sharing} is not supported for {self.display_name} (the shared paths are not "
                "exact for this family); set group_sharing: none")

    def router_aux_loss(self, model, router_logits, attention_mask=None):
        """The MoE router's load-balancing loss from a forward's router logits (MoE families only)."""
        raise UnsupportedModelError(f"{self.display_name} has no mixture-of-experts router")

    # ---- files and tokens ----
    @abstractmethod
    def published_thinker_name(self, name: str) -> str:
        ...

    def eos_id(self, tokenizer) -> int:
        return tokenizer.convert_tokens_to_ids(self.end_of_turn_token)

    @abstractmethod
    def media_token_ids(self, tokenizer) -> list[int]:
        ...

    # ---- the forward ----
    @abstractmethod
    def embed_prompt(self, model: nn.Module, prompt: PromptInputs) -> EmbeddedPrompt:
        ...

    @abstractmethod
    def stack_prompts(self, prompts: Sequence[EmbeddedPrompt]) -> EmbeddedPrompt:
        """Embedded prompts of one length P as the rows of one batch: embeds [n, P, H], their positions and extras
        (what `run_decoder(..., prompt=stacked)` needs to run all n prompts in one call)."""

    @abstractmethod
    def embed_tokens(self, model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        ...

    @abstractmethod
    def positions_after_prompt(self, prompt: EmbeddedPrompt, start, length: int, rows: int = 1) -> torch.Tensor:
        ...

    @abstractmethod
    def run_decoder(self, model: nn.Module, embeds: torch.Tensor, positions: torch.Tensor, *,
                    prompt: EmbeddedPrompt | None = None, cache=None, use_cache: bool = False,
                    attention_mask: torch.Tensor | None = None, **attention_kwargs) -> DecoderOutput:
        ...

    @abstractmethod
    def output_head(self, model: nn.Module) -> nn.Module:
        ...

    @abstractmethod
    def decoder(self, model: nn.Module) -> nn.Module:
        ...

    @abstractmethod
    def forward_repeated(self, model: nn.Module, prompt: PromptInputs, completion_ids: torch.Tensor,
                         router_logits: bool = False) -> tuple[torch.Tensor, Any]:
        ...

    @abstractmethod
    def generate(self, model: nn.Module, batch: dict[str, Any], generation_config) -> torch.Tensor:
        ...
