"""Per-token log-probabilities of each group's completions under a model.

    group_token_logps(model, groups, sharing) -> list of [G, C] tensors (one per group)

logp[i, t] = log softmax(logits / temperature)[completion_ids[i, t]] for the logits that predict
completion token t of completion i. Values under the completion mask's zeros are meaningless.

Three exact paths (`sharing`), equal within float rounding (tests compare them):

* "none"     the plain repeat-G path: the thinker's own forward on G copies of [prompt, completion_i],
             media repeated G times, so encoders and prompt run G times (what other trainers do).
* "encoders" the encoders run once per prompt (`embed_prompt`); the language model still runs on
             G x (P + C) tokens.
* "full"     the prompt runs once too (`prefix` picks how; "auto" = `full_sharing_path`):
             - "kv" (prompt K/V, the default everywhere it is exact): the prompt runs once, with
               grad, and each layer's keys/values are recorded through a cache; the G
               completions then run as a batch [G, C-1] whose attention (`prompt_attention`) sees
               the one prompt K/V and their own, causally — never G copies of the prompt K/V; the
               gradient of the prompt K/V is summed over the group. P + G*(C-1) tokens; attention
               G*(C-1) x (P + C).
             - "packed": one sequence [prompt, c_1 .. c_G] with a block-causal mask (completion i
               sees the prompt and itself) and per-completion positions: P + sum(C_i - 1) tokens,
               no padding, but the dense [L, L] mask makes attention compute every masked block
               too (L = P + G*C), which grows as G^2 C^2.
             Why "kv" also under gradient checkpointing: transformers drops caches inside
             checkpointed layers, because a cache that appends would be appended to again when
             backward replays the layer. The prompt pass's recorder never appends (a replay
             overwrites with equal tensors), so we let it through (`_can_checkpoint_with_cache`
             on the layers, for the duration of the call); the completion pass takes the prompt
             K/V as an argument, not a cache.
             The non-reentrant checkpoint differentiates the recorded K/V like any tensor of
             the graph; a reentrant one would not (it runs the layer under no_grad), so there
             "auto" falls back to "packed". Measured on the benchmark shape (P ~ 720, G = 16,
             C = 128/256, CPU, checkpointing on): "kv" takes about half the time of "packed"
             for the policy forward + backward (docs/performance.md).

Group sharing is a family capability (`OmniFamily.supports_group_sharing`; a family whose shared paths
are not exact is refused for "encoders" / "full"). Qwen3-Omni's deepstack features (vision-encoder
outputs added to the first language-model layers at the visual positions) go with the prompt: tiled
G ways on "encoders", in the prompt pass on "full" (the prompt K/V then carry them; completions have
no visual positions), over the prompt part of the packed sequence.

Mixture-of-experts models: when the thinker carries a router aux-loss weight (`prepare_for_training`,
`router_aux_loss_coef` > 0), the "none" path with grad also computes the router's load-balancing
loss over the group's real tokens (prompt + completion up to EOS) and adds its gradient, weighted,
in backward (`_with_loss_gradient`: the hidden states pass unchanged); its value is recorded on the
thinker (`record_router_aux_loss`) and the step logs the mean as `router_aux_loss`.

The [N, vocab] logits are produced in row chunks and reduced to log-probs immediately (with the
chunk recomputed in backward), so [G, C, vocab] fp32 logits never exist at once.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from torch.utils.checkpoint import checkpoint
from transformers.cache_utils import Cache, DynamicLayer

from echoink.choices import GROUP_SHARING
from echoink.compat import attention_implementation_of, caches_allowed_under_checkpointing
from echoink.grpo.prompt_attention import prompt_attention
from echoink.grpo.types import Group
from echoink.model.families import family_of_model
from echoink.model.trainable import record_router_aux_loss, router_aux_loss_weight
from echoink.model.prompt_embedding import (
    completion_positions,
    embed_prompt_with_deepstack,
    masked_attention,
    prompt_positions,
    require_full_attention,
)

COMPLETION_TOKENS_PER_CHUNK = 1024  # prompt-K/V path: completion tokens per language-model call
PREFIX_PATHS = ("auto", "kv", "packed")


def group_token_logps(model, groups: list[Group], sharing: str = "full", temperature: float = 1.0,
                      chunk_size: int = 1024, prefix: str = "auto") -> list[torch.Tensor]:
    """-> one [G, C] tensor of per-token log-probs per group (with grad if grad is enabled).

    `prefix` picks how "full" shares the prompt: "kv", "packed", or "auto" (`full_sharing_path`).
    """
    if sharing not in GROUP_SHARING:
        raise ValueError(f"sharing must be one of {GROUP_SHARING}, got {sharing!r}")
    if prefix not in PREFIX_PATHS:
        raise ValueError(f"prefix must be one of {PREFIX_PATHS}, got {prefix!r}")
    if sharing != "none":
        family_of_model(model).require_group_sharing(sharing)
    if sharing == "full":
        require_full_attention(model.model.language_model)
        if prefix == "auto":
            prefix = full_sharing_path(model)
    results = []
    for group in groups:
        if sharing == "none":
            hidden = _hidden_plain(model, group)
        elif sharing == "encoders":
            hidden = _hidden_encoders_once(model, group)
        elif prefix == "packed":
            hidden = _hidden_packed(model, group)
        else:
            hidden = _hidden_prompt_kv(model, group)
        results.append(token_logps_from_hidden(model.lm_head, hidden, group.completion_ids, temperature, chunk_size))
    return results


def full_sharing_path(model) -> str:
    """The "full" path for this model as it is now: "kv" unless a reentrant checkpoint is active."""
    if _checkpointing(model) and _checkpoint_is_reentrant(model):
        return "packed"
    return "kv"


def token_logps_from_hidden(lm_head, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                            chunk_size: int = 1024) -> torch.Tensor:
    """hidden [G, C, H] (the states that predict each target), targets [G, C] -> log-probs [G, C].

    Rows are processed `chunk_size` at a time; each chunk's logits are recomputed in backward
    instead of being stored, so peak memory holds one [chunk_size, vocab] fp32 block.
    """
    g, c, h = hidden.shape
    flat_hidden, flat_targets = hidden.reshape(g * c, h), targets.reshape(g * c)
    pieces = []
    for start in range(0, g * c, chunk_size):
        rows = slice(start, start + chunk_size)
        if torch.is_grad_enabled() and flat_hidden.requires_grad:
            pieces.append(checkpoint(_chunk_logps, lm_head, flat_hidden[rows], flat_targets[rows], temperature,
                                     use_reentrant=False))
        else:
            pieces.append(_chunk_logps(lm_head, flat_hidden[rows], flat_targets[rows], temperature))
    return torch.cat(pieces).view(g, c)


def _chunk_logps(lm_head, hidden: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = lm_head(hidden).float() / temperature                       # [n, V]
    return logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)


# ---- the three ways to get the hidden states that predict each completion token ------------------

def _hidden_plain(model, group: Group) -> torch.Tensor:
    """Thinker forward on G copies of [prompt, completion]: -> [G, C, H]."""
    prompt, g, p = group.prompt, group.size, group.prompt.length
    ids = torch.cat([prompt.input_ids.expand(g, -1), group.completion_ids], dim=1)          # [G, P + C]
    aux_weight = router_aux_loss_weight(model) if torch.is_grad_enabled() else 0.0
    router = {"output_router_logits": True} if aux_weight > 0 else {}
    out = model.model(input_ids=ids, attention_mask=torch.ones_like(ids),
                      use_audio_in_video=prompt.use_audio_in_video, use_cache=False,
                      **_repeat_media(prompt.media, g), **router)
    model.model.rope_deltas = None  # state the thinker keeps between forwards; don't let it leak
    hidden = out.last_hidden_state[:, p - 1:-1]
    if aux_weight > 0:
        real = torch.cat([torch.ones_like(prompt.input_ids).expand(g, -1), group.completion_mask], dim=1)  # [G, P+C]
        aux = family_of_model(model).router_aux_loss(model, out.router_logits, real)
        record_router_aux_loss(model, float(aux.detach()))
        hidden = _with_loss_gradient(hidden, aux * aux_weight)
    return hidden


class _LossGradient(torch.autograd.Function):
    """Identity on `hidden`; in backward it also sends gradient 1 into `loss`, as if `loss` were added to the
    objective (the weight is folded into `loss`). Needs no change to how the caller builds its loss."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        ctx.loss_shape = loss.shape
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad_hidden: torch.Tensor):
        return grad_hidden, grad_hidden.new_ones(ctx.loss_shape, dtype=torch.float32)


def _with_loss_gradient(hidden: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    return _LossGradient.apply(hidden, loss.float())


def _repeat_media(media: dict[str, torch.Tensor], g: int) -> dict[str, torch.Tensor]:
    """Media of one prompt repeated for G identical prompts (what the plain path feeds the thinker)."""
    repeated = {}
    for key, value in media.items():
        if key in ("input_features", "feature_attention_mask", "image_grid_thw", "video_grid_thw", "video_second_per_grid"):
            repeated[key] = value.repeat(g, *([1] * (value.dim() - 1)))
        else:  # pixel_values / pixel_values_videos: patches of all images are concatenated
            repeated[key] = value.repeat(g, 1)
    return repeated


def _hidden_encoders_once(model, group: Group) -> torch.Tensor:
    """Encoders once, language model on G x (P + C) tokens: -> [G, C, H]."""
    prompt, g, p = group.prompt, group.size, group.prompt.length
    prompt_embeds, deepstack = embed_prompt_with_deepstack(model, prompt)                   # [1, P, H]
    completion_embeds = model.get_input_embeddings()(group.completion_ids)                  # [G, C, H]
    embeds = torch.cat([prompt_embeds.expand(g, -1, -1), completion_embeds], dim=1)        # [G, P + C, H]
    prompt_pos = prompt_positions(model, prompt)                                            # [3, 1, P]
    positions = torch.cat([prompt_pos, completion_positions(prompt_pos, group.completion_ids.shape[1])], dim=2)
    extra = deepstack.language_model_kwargs(g, embeds.shape[1]) if deepstack else {}       # tiled G ways
    out = model.model.language_model(inputs_embeds=embeds, position_ids=positions.expand(3, g, -1), use_cache=False,
                                     **extra)
    return out.last_hidden_state[:, p - 1:-1]


def _hidden_prompt_kv(model, group: Group) -> torch.Tensor:
    """Prompt once with grad, its K/V shared by the G completions: -> [G, C, H]."""
    prompt, g, c, p = group.prompt, group.size, group.completion_ids.shape[1], group.prompt.length
    language_model = model.model.language_model
    prompt_pos = prompt_positions(model, prompt)                                            # [3, 1, P]
    recorder = Cache(layers=[_RecordLayer() for _ in language_model.layers])
    with caches_allowed_under_checkpointing(language_model.layers):
        prompt_embeds, deepstack = embed_prompt_with_deepstack(model, prompt)               # [1, P, H]
        out = language_model(inputs_embeds=prompt_embeds, position_ids=prompt_pos, past_key_values=recorder,
                             use_cache=False, **(deepstack.language_model_kwargs() if deepstack else {}))
        last_prompt_state = out.last_hidden_state[:, -1:].expand(g, -1, -1)                # [G, 1, H]
        if c == 1:
            return last_prompt_state
        completion_embeds = model.get_input_embeddings()(group.completion_ids[:, :-1])      # [G, C-1, H]
        positions = completion_positions(prompt_pos, c - 1)                                  # [3, 1, C-1]
        prompt_kv = [(layer.recorded_keys, layer.recorded_values) for layer in recorder.layers]  # [1, kvh, P, d]
        # Completions run in chunks of about COMPLETION_TOKENS_PER_CHUNK tokens: each chunk's attention
        # scores [chunk, heads, C-1, P+C-1] are transient (and recomputed chunk by chunk in backward).
        per_chunk = max(1, COMPLETION_TOKENS_PER_CHUNK // (c - 1))
        states = []
        with prompt_attention(language_model):  # token t sees the whole prompt and its own tokens 0..t
            for chunk in completion_embeds.split(per_chunk):
                out = language_model(inputs_embeds=chunk, position_ids=positions.expand(3, chunk.shape[0], -1),
                                     use_cache=False, shared_prompt_kv=prompt_kv)
                states.append(out.last_hidden_state)
    return torch.cat([last_prompt_state, torch.cat(states)], dim=1)


class _RecordLayer(DynamicLayer):
    """Prompt pass: passes the layer's keys/values through and keeps them (it never grows).

    Under gradient checkpointing the backward replay of a layer calls `update` again with equal
    tensors; keeping the latest (instead of appending, as DynamicLayer does) makes that harmless.
    """

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.recorded_keys, self.recorded_values = key_states, value_states
        return key_states, value_states


def _checkpointing(model) -> bool:
    """Whether the language model's layers recompute their activations in backward right now."""
    return model.training and any(getattr(layer, "gradient_checkpointing", False)
                                  for layer in model.model.language_model.layers)


def _checkpoint_is_reentrant(model) -> bool:
    """True unless the layers' checkpoint function is known to be the non-reentrant one.

    A reentrant checkpoint runs the layer under no_grad and only differentiates its positional
    inputs, so the prompt K/V handed out through the cache would silently get no gradient.
    """
    for layer in model.model.language_model.layers:
        function = getattr(layer, "_gradient_checkpointing_func", None)
        if function is not None and getattr(function, "keywords", {}).get("use_reentrant", True):
            return True
    return False


def _hidden_packed(model, group: Group) -> torch.Tensor:
    """One packed sequence [prompt, c_1 .. c_G] with a block-causal mask: -> [G, C, H]."""
    prompt, c, p = group.prompt, group.completion_ids.shape[1], group.prompt.length
    lengths = group.completion_lengths.clamp(min=1).tolist()                                # C_i (>= 1)
    prompt_embeds, deepstack = embed_prompt_with_deepstack(model, prompt)
    prompt_embeds = prompt_embeds[0]                                                        # [P, H]
    token_embeds = model.get_input_embeddings()
    pieces, starts = [prompt_embeds], []
    offset = p
    for i, length in enumerate(lengths):
        # completion i's inputs are its tokens 0..C_i-2 (token C_i-1 is only a target)
        pieces.append(token_embeds(group.completion_ids[i, : length - 1]))
        starts.append(offset)
        offset += length - 1
    embeds = torch.cat(pieces, dim=0).unsqueeze(0)                                          # [1, L, H]
    total = embeds.shape[1]

    prompt_pos = prompt_positions(model, prompt)                                            # [3, 1, P]
    first = prompt_pos.max() + 1
    pos_pieces = [prompt_pos] + [(first + torch.arange(n - 1, device=embeds.device)).view(1, 1, -1).expand(3, 1, -1)
                                 for n in lengths]
    positions = torch.cat(pos_pieces, dim=2)                                                # [3, 1, L]

    allowed = torch.zeros(total, total, dtype=torch.bool, device=embeds.device)            # [L, L] query x key
    allowed[:p, :p] = torch.ones(p, p, dtype=torch.bool, device=embeds.device).tril()
    for start, length in zip(starts, lengths):
        end = start + length - 1
        allowed[start:end, :p] = True
        allowed[start:end, start:end] = torch.ones(length - 1, length - 1, dtype=torch.bool,
                                                   device=embeds.device).tril()
    mask = _attention_mask(model, allowed, embeds.dtype)
    with masked_attention(model.model.language_model):
        out = model.model.language_model(inputs_embeds=embeds, position_ids=positions, attention_mask=mask,
                                         use_cache=False,
                                         **(deepstack.language_model_kwargs(1, total) if deepstack else {}))
    states = out.last_hidden_state[0]                                                       # [L, H]

    rows = []
    for start, length in zip(starts, lengths):
        # token 0 is predicted by the last prompt state, token t by completion state t-1
        index = torch.cat([torch.tensor([p - 1], device=states.device),
                           torch.arange(start, start + length - 1, device=states.device)])
        rows.append(states.index_select(0, index))
    hidden = pad_sequence(rows, batch_first=True)                                           # [G, max C_i, H]
    return F.pad(hidden, (0, 0, 0, c - hidden.shape[1]))


def _attention_mask(model, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[L, L] bool -> the 4-D mask the attention implementation takes (sdpa: bool; eager: additive float)."""
    if attention_implementation_of(model.config) == "sdpa":
        return allowed[None, None]
    additive = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return additive.masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


class Policy(nn.Module):
    """The module accelerate wraps: forward(groups) -> list of [G, C] per-token log-probs (with grad).

    Its forward is a real module call, so DDP's gradient hooks and ZeRO-3's parameter gathering see
    the policy pass; rollouts and the no-grad passes use the unwrapped thinker directly.
    """

    def __init__(self, thinker: nn.Module) -> None:
        super().__init__()
        self.thinker = thinker

    def forward(self, groups, sharing: str = "full", temperature: float = 1.0) -> list[torch.Tensor]:
        return group_token_logps(self.thinker, groups, sharing=sharing, temperature=temperature)
