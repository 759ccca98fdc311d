"""The hidden states that predict each completion token of a group, by the `group_sharing` path.

    completion_states(model, prompt, completion_ids [G, C], completion_mask [G, C], sharing)
        -> hidden [G, C, H]: row t of completion i is the state whose output-head logits predict token t

Written once against the family's forward (`OmniFamily`: embed_prompt, run_decoder, forward_repeated, ...)
and the attention kernels (`model.attention`); the log-probs (grpo/logprobs.py) apply the output head.

Three exact paths (`sharing`), equal within float rounding (tests compare them):

* "none"     the plain repeat-G path: the thinker's own forward on G copies of [prompt, completion_i],
             media repeated G times, so encoders and prompt run G times (what other trainers do).
* "encoders" the encoders run once per prompt (`OmniFamily.embed_prompt`); the language model still runs on
             G x (P + C) tokens.
* "full"     the prompt runs once too (`prefix` picks how; "auto" = `full_sharing_path`):
             - "kv" (prompt K/V, the default everywhere it is exact): the prompt runs once, with
               grad, and each layer's keys/values are recorded through a cache; the G
               completions then run as a batch [G, C-1] whose attention (`attention.prompt_attention`) sees
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

"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence
from transformers.cache_utils import Cache, DynamicLayer

from echoink.choices import GROUP_SHARING
from echoink.compat import attention_implementation_of, caches_allowed_under_checkpointing, checkpoint_function_of
from echoink.model.attention import masked_attention, prompt_attention, require_full_attention
from echoink.model.families import OmniFamily, family_of_model
from echoink.model.inputs import PromptInputs
from echoink.model.trainable import record_router_aux_loss, router_aux_loss_weight

COMPLETION_TOKENS_PER_CHUNK = 1024  # prompt-K/V path: completion tokens per language-model call
PREFIX_PATHS = ("auto", "kv", "packed")


def check_sharing(model, sharing: str, prefix: str = "auto") -> str:
    """Validate `sharing` (and `prefix`) for this model; -> the path to run: "none", "encoders", "kv" or "packed"."""
    if sharing not in GROUP_SHARING:
        raise ValueError(f"sharing must be one of {GROUP_SHARING}, got {sharing!r}")
    if prefix not in PREFIX_PATHS:
        raise ValueError(f"prefix must be one of {PREFIX_PATHS}, got {prefix!r}")
    family = family_of_model(model)
    if sharing != "none":
        family.require_group_sharing(sharing)
    if sharing != "full":
        return sharing
    require_full_attention(family.decoder(model))
    return full_sharing_path(model) if prefix == "auto" else prefix


def completion_states(model, prompt: PromptInputs, completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                      path: str) -> torch.Tensor:
    """-> [G, C, H] hidden states predicting each completion token, by `path` (from `check_sharing`)."""
    family = family_of_model(model)
    if path == "none":
        return _hidden_plain(family, model, prompt, completion_ids, completion_mask)
    if path == "encoders":
        return _hidden_encoders_once(family, model, prompt, completion_ids)
    if path == "packed":
        return _hidden_packed(family, model, prompt, completion_ids, completion_mask)
    return _hidden_prompt_kv(family, model, prompt, completion_ids)


def full_sharing_path(model) -> str:
    """The "full" path for this model as it is now: "kv" unless a reentrant checkpoint is active."""
    if _checkpointing(model) and _checkpoint_is_reentrant(model):
        return "packed"
    return "kv"


# ---- the three ways to get the hidden states that predict each completion token ------------------

def _hidden_plain(family: OmniFamily, model, prompt: PromptInputs, completion_ids, completion_mask) -> torch.Tensor:
    """Thinker forward on G copies of [prompt, completion]: -> [G, C, H]."""
    g, p = completion_ids.shape[0], prompt.length
    aux_weight = router_aux_loss_weight(model) if torch.is_grad_enabled() else 0.0
    states, router_logits = family.forward_repeated(model, prompt, completion_ids, router_logits=aux_weight > 0)
    hidden = states[:, p - 1:-1]
    if aux_weight > 0:
        real = torch.cat([torch.ones_like(prompt.input_ids).expand(g, -1), completion_mask], dim=1)  # [G, P+C]
        aux = family.router_aux_loss(model, router_logits, real)
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


def _hidden_encoders_once(family: OmniFamily, model, prompt: PromptInputs, completion_ids) -> torch.Tensor:
    """Encoders once, language model on G x (P + C) tokens: -> [G, C, H]."""
    (g, c), p = completion_ids.shape, prompt.length
    embedded = family.embed_prompt(model, prompt)                                          # [1, P, H]
    completion_embeds = family.embed_tokens(model, completion_ids)                         # [G, C, H]
    embeds = torch.cat([embedded.embeds.expand(g, -1, -1), completion_embeds], dim=1)     # [G, P + C, H]
    positions = torch.cat([embedded.positions, family.positions_after_prompt(embedded, 0, c)], dim=2)
    out = family.run_decoder(model, embeds, positions.expand(-1, g, -1), prompt=embedded)  # extras tiled G ways
    return out.hidden[:, p - 1:-1]


def _hidden_prompt_kv(family: OmniFamily, model, prompt: PromptInputs, completion_ids) -> torch.Tensor:
    """Prompt once with grad, its K/V shared by the G completions: -> [G, C, H]."""
    g, c = completion_ids.shape
    decoder = family.decoder(model)
    recorder = Cache(layers=[_RecordLayer() for _ in decoder.layers])
    with caches_allowed_under_checkpointing(decoder.layers):
        embedded = family.embed_prompt(model, prompt)                                      # [1, P, H]
        out = family.run_decoder(model, embedded.embeds, embedded.positions, prompt=embedded, cache=recorder)
        last_prompt_state = out.hidden[:, -1:].expand(g, -1, -1)                           # [G, 1, H]
        if c == 1:
            return last_prompt_state
        completion_embeds = family.embed_tokens(model, completion_ids[:, :-1])             # [G, C-1, H]
        prompt_kv = [(layer.recorded_keys, layer.recorded_values) for layer in recorder.layers]  # [1, kvh, P, d]
        # Completions run in chunks of about COMPLETION_TOKENS_PER_CHUNK tokens: each chunk's attention
        # scores [chunk, heads, C-1, P+C-1] are transient (and recomputed chunk by chunk in backward).
        per_chunk = max(1, COMPLETION_TOKENS_PER_CHUNK // (c - 1))
        states = []
        with prompt_attention(decoder):  # token t sees the whole prompt and its own tokens 0..t
            for chunk in completion_embeds.split(per_chunk):
                positions = family.positions_after_prompt(embedded, 0, c - 1, rows=chunk.shape[0])
                out = family.run_decoder(model, chunk, positions, shared_prompt_kv=prompt_kv)
                states.append(out.hidden)
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
    decoder = family_of_model(model).decoder(model)
    return model.training and any(getattr(layer, "gradient_checkpointing", False) for layer in decoder.layers)


def _checkpoint_is_reentrant(model) -> bool:
    """True unless the layers' checkpoint function is known to be the non-reentrant one.

    A reentrant checkpoint runs the layer under no_grad and only differentiates its positional
    inputs, so the prompt K/V handed out through the cache would silently get no gradient.
    """
    for layer in family_of_model(model).decoder(model).layers:
        function = checkpoint_function_of(layer)
        if function is not None and getattr(function, "keywords", {}).get("use_reentrant", True):
            return True
    return False


def _hidden_packed(family: OmniFamily, model, prompt: PromptInputs, completion_ids, completion_mask) -> torch.Tensor:
    """One packed sequence [prompt, c_1 .. c_G] with a block-causal mask: -> [G, C, H]."""
    c, p = completion_ids.shape[1], prompt.length
    lengths = completion_mask.sum(dim=1).clamp(min=1).tolist()                             # C_i (>= 1)
    embedded = family.embed_prompt(model, prompt)
    pieces, starts = [embedded.embeds[0]], []                                              # [P, H] first
    offset = p
    for i, length in enumerate(lengths):
        # completion i's inputs are its tokens 0..C_i-2 (token C_i-1 is only a target)
        pieces.append(family.embed_tokens(model, completion_ids[i, : length - 1]))
        starts.append(offset)
        offset += length - 1
    embeds = torch.cat(pieces, dim=0).unsqueeze(0)                                          # [1, L, H]
    total = embeds.shape[1]
    positions = torch.cat([embedded.positions] + [family.positions_after_prompt(embedded, 0, n - 1)
                                                  for n in lengths], dim=2)                # [.., 1, L]

    allowed = torch.zeros(total, total, dtype=torch.bool, device=embeds.device)            # [L, L] query x key
    allowed[:p, :p] = torch.ones(p, p, dtype=torch.bool, device=embeds.device).tril()
    for start, length in zip(starts, lengths):
        end = start + length - 1
        allowed[start:end, :p] = True
        allowed[start:end, start:end] = torch.ones(length - 1, length - 1, dtype=torch.bool,
                                                   device=embeds.device).tril()
    decoder = family.decoder(model)
    mask = _attention_mask(model, allowed, embeds.dtype)
    with masked_attention(decoder):
        out = family.run_decoder(model, embeds, positions, prompt=embedded, attention_mask=mask)
    states = out.hidden[0]                                                                  # [L, H]

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
