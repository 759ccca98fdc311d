"""The attention kernels of the model layer, and the switch that routes a decoder through one.

    attention_implementation(decoder, name)   run the decoder's attention through the registered `name` for a
                                              while (gradient-checkpoint replays included)
    masked_attention(decoder)                 explicit 4-D masks: GQA-native sdpa on CPU (`GQA_SDPA`), else as is
    prompt_attention(decoder)                 TRAINING: a batch of completions attends to ONE shared prompt K/V
                                              and causally to its own K/V, with gradient (`SharedPromptAttention`)
    shared_prefix_attention(decoder)          DECODING: G continuations of one prompt, one new token each, attend
                                              to the prompt K/V kept once (`SharedPrefixCache`)
    require_full_attention(decoder)           the shared paths build their own masks: no sliding windows

`decoder` is the family's language model (`OmniFamily.decoder(model)`); only the model layer holds it.

Training shared-prompt attention
--------------------------------
Attention of a batch of completions to ONE shared prompt K/V and to their own K/V, with gradient.

The "full" log-prob path (`model.group_forward`, prompt K/V) runs the prompt once, then the G completions
of its group as a batch. Each completion token attends to the whole prompt and causally to its own
tokens:

    out[b, h, t] = sum_p  a[b, h, t, p] * V_prompt[h', p]  +  sum_{s <= t} a[b, h, t, P + s] * V[b, h', s]
    a[b, h, t, :] = softmax(scale * q[b, h, t] . [K_prompt[h'], K[b, h'] (s <= t)])     h' = h // (heads / kv_heads)

Attention over one concatenated key set [K_prompt copied B ways, K[b]] gives the same numbers but keeps
that [B, kvh, P + T, d] copy for backward in every layer and chunk: for the Qwen3-Omni benchmark shape
(P = 523, G = 16, C = 256, 4 layers, float32) 45 MiB of the 710 MiB the policy pass keeps; for a 7B
model (28 layers, 4 K/V heads of 128, P ~ 1500, G = 16, bfloat16) about 1.3 GiB. `SharedPromptAttention`
keeps the prompt K/V once. Saved for backward: q [B, H, T, d], K_prompt / V_prompt [1, kvh, P, d] (the
prompt pass's own tensors), K / V [B, kvh, T, d], the output [B, T, H, d] (the tensor the output
projection keeps anyway) and the row log-sum-exp; backward recomputes the attention probabilities
from them, as flash attention does, and sums the prompt's dK / dV over the completions.

Two kernels, equal within float rounding (tests compare both with the concatenated attention and with
finite differences): "flash_cpu" (PyTorch's CPU flash-attention kernels, which return the log-sum-exp;
the default on CPU, as fast as the masked kernel it replaces) and "matmul" (plain matmuls, one
completion at a time; the default on other devices, whose speed there is not measured yet).

`prompt_attention(decoder)` routes a decoder's attention here for a while; its forward
then takes `shared_prompt_kv=[(K_prompt, V_prompt) per layer]` and no cache.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from echoink.compat import (
    attention_implementation_of,
    attention_implementation_set,
    checkpoint_functions_wrapped,
    cpu_flash_attention,
    cpu_flash_attention_backward,
)


# ---- switching a decoder's attention function -------------------------------------------------------------

@contextmanager
def attention_implementation(decoder, name: str):
    """Run the language model's attention through the registered function `name` for a while.

    The attention modules look their function up in the (text) config at every call; this swaps
    the name there and puts the previous one back, also on error. Gradient checkpointing replays
    a layer's forward during backward, after this context has ended: the checkpoint function of
    each checkpointed layer is wrapped meanwhile, so that the replay runs under `name` too (a
    replay under another implementation would not match the forward).
    """
    with checkpoint_functions_wrapped(decoder.layers,
                                      lambda original: _replays_under(original, decoder.config, name)):
        with attention_implementation_set(decoder.config, name):
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


def require_full_attention(decoder) -> None:
    """The shared paths build their own masks, which know nothing of sliding windows."""
    if getattr(decoder, "has_sliding_layers", False):
        raise ValueError("group_sharing: full does not support sliding-window attention layers "
                         "(Qwen2.5-Omni has none); set group_sharing: none for this model")


def masked_attention(decoder):
    """Context for forwards that pass an explicit 4-D mask: GQA-native sdpa when the model uses sdpa."""
    if attention_implementation_of(decoder.config) == "sdpa":
        return attention_implementation(decoder, GQA_SDPA)
    return nullcontext()


# ---- training: completions attending to one shared prompt K/V, with gradient ----------------

SHARED_PROMPT_ATTENTION = "echoink_shared_prompt"


class SharedPromptAttention(torch.autograd.Function):
    """(q [B, H, T, d], K_prompt, V_prompt [1, kvh, P, d], K, V [B, kvh, T, d], scale[, kernel]) -> out [B, T, H, d].

    `kernel`: "flash_cpu" (PyTorch's CPU flash-attention kernels, the default on CPU) or "matmul" (plain
    matmuls, the default elsewhere); both give the same numbers (tests compare them).
    """

    @staticmethod
    def forward(ctx, query, prompt_keys, prompt_values, keys, values, scale: float, kernel: str | None = None):
        inputs = (query, prompt_keys, prompt_values, keys, values)
        dtype = functools.reduce(torch.promote_types, [tensor.dtype for tensor in inputs])  # autocast can mix them
        kernel = KERNELS[kernel or default_kernel(query.device)]
        out, lse = kernel.forward(*[tensor.to(dtype) for tensor in inputs], scale)
        ctx.scale, ctx.kernel, ctx.dtype = scale, kernel, dtype
        ctx.save_for_backward(*inputs, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        *inputs, out, lse = ctx.saved_tensors
        grads = ctx.kernel.backward(grad_out.to(ctx.dtype), *[tensor.to(ctx.dtype) for tensor in inputs], out, lse,
                                    ctx.scale)
        return *[grad.to(tensor.dtype) for grad, tensor in zip(grads, inputs)], None, None


class _FlashCpu:
    """Two flash-attention calls — every completion token against the prompt (one [1, H, B*T, d] query
    block, no mask), and each completion causally against itself — merged by their log-sum-exps:

        lse = logaddexp(lse_prompt, lse_own)     out = e^(lse_prompt - lse) out_prompt + e^(lse_own - lse) out_own

    Backward calls the kernel's backward on each part with the MERGED out and lse: it recomputes
    P = exp(S - lse), the true probabilities over both parts, and rowsum(dO * out), so each call returns
    its part of dq and its keys' dK / dV exactly."""

    @staticmethod
    def forward(query, prompt_keys, prompt_values, keys, values, scale):
        b, h, t, d = query.shape
        prompt_out, prompt_lse = cpu_flash_attention(_fold(query), prompt_keys, prompt_values, 0.0, False, scale=scale)
        own_out, own_lse = cpu_flash_attention(query, keys, values, 0.0, True, scale=scale)  # [B, H, T, d], [B, H, T]
        prompt_out, prompt_lse = _unfold(prompt_out, b), _unfold(prompt_lse[..., None], b)[..., 0]
        lse = torch.logaddexp(prompt_lse, own_lse)                                         # [B, H, T]
        out = query.new_empty(b, t, h, d)                                                  # [B, T, H, d]
        torch.mul(own_out, (own_lse - lse).exp()[..., None], out=out.transpose(1, 2))
        out.transpose(1, 2).addcmul_(prompt_out, (prompt_lse - lse).exp()[..., None])
        return out, lse

    @staticmethod
    def backward(grad_out, query, prompt_keys, prompt_values, keys, values, out, lse, scale):
        b = query.shape[0]
        grad_out, out = grad_out.transpose(1, 2), out.transpose(1, 2)                     # [B, H, T, d]
        d_prompt_q, d_prompt_keys, d_prompt_values = cpu_flash_attention_backward(
            _fold(grad_out), _fold(query), prompt_keys, prompt_values, _fold(out), _fold(lse[..., None])[..., 0],
            0.0, False, scale=scale)
        d_q, d_keys, d_values = cpu_flash_attention_backward(grad_out, query, keys, values, out, lse, 0.0, True,
                                                             scale=scale)
        return d_q + _unfold(d_prompt_q, b), d_prompt_keys, d_prompt_values, d_keys, d_values


def _fold(tensor: torch.Tensor) -> torch.Tensor:
    """[B, H, T, d] -> [1, H, B*T, d] (all completion tokens as one query block)."""
    b, h, t, d = tensor.shape
    return tensor.transpose(0, 1).reshape(1, h, b * t, d)


def _unfold(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    """[1, H, B*T, d] -> [B, H, T, d]."""
    _, h, bt, d = tensor.shape
    return tensor.view(h, batch, bt // batch, d).transpose(0, 1)


class _Matmul:
    """The same attention in plain matmuls (any device), scores in float32 (or the inputs' dtype if wider):

        P  = exp(S - lse)                       S = scale * q K^T over [prompt, own] keys
        dV = P^T dO        dS = P * (dO V^T - rowsum(dO * O))        dq = scale * dS K   dK = scale * dS^T q

    one completion at a time (transient scores [kvh, rep, T, P + T]), the prompt's dK / dV summed over them."""

    @staticmethod
    def forward(query, prompt_keys, prompt_values, keys, values, scale):
        pieces = [_matmul_forward(query[i:i + 1], prompt_keys, prompt_values, keys[i:i + 1], values[i:i + 1], scale)
                  for i in range(query.shape[0])]
        out = torch.cat([piece for piece, _ in pieces])                                    # [B, T, H, d]
        return out.to(query.dtype), torch.cat([lse for _, lse in pieces], dim=1)            # lse [kvh, B, rep, T]

    @staticmethod
    def backward(grad_out, query, prompt_keys, prompt_values, keys, values, out, lse, scale):
        d_query, d_keys, d_values, d_prompt_keys, d_prompt_values = [], [], [], 0, 0
        for i in range(query.shape[0]):
            d_q, d_pk, d_pv, d_k, d_v = _matmul_backward(grad_out[i:i + 1], query[i:i + 1], prompt_keys, prompt_values,
                                                         keys[i:i + 1], values[i:i + 1], out[i:i + 1], lse[:, i:i + 1],
                                                         scale)
            d_query.append(d_q), d_keys.append(d_k), d_values.append(d_v)
            d_prompt_keys, d_prompt_values = d_prompt_keys + d_pk, d_prompt_values + d_pv
        # in the compute dtype: SharedPromptAttention.backward casts each to its input's dtype
        return torch.cat(d_query), d_prompt_keys, d_prompt_values, torch.cat(d_keys), torch.cat(d_values)


def _matmul_forward(query, prompt_keys, prompt_values, keys, values, scale):
    """-> out [B, T, H, d], lse [kvh, B, rep, T], in the compute dtype."""
    q, pk, pv, k, v = _operands(query, prompt_keys, prompt_values, keys, values, _compute_dtype(query))
    prompt_scores, own_scores = _scores(q, pk, k, scale)
    lse = torch.logaddexp(prompt_scores.logsumexp(-1), own_scores.logsumexp(-1))      # [kvh, B, rep, T]
    kvh, b, rep, t, p = prompt_scores.shape
    out = torch.matmul((prompt_scores - lse[..., None]).exp_().view(kvh, -1, p), pv).view(kvh, b, rep, t, -1)
    out = out + torch.matmul((own_scores - lse[..., None]).exp_(), v.unsqueeze(2))      # [kvh, B, rep, T, d]
    return out.permute(1, 3, 0, 2, 4).reshape(query.shape[0], t, -1, query.shape[3]), lse


def _matmul_backward(grad_out, query, prompt_keys, prompt_values, keys, values, out, lse, scale):
    """-> d_query [B, H, T, d], d_prompt_keys / values [1, kvh, P, d], d_keys / values [B, kvh, T, d]
    (in the compute dtype)."""
    dtype, kvh, (b, h, t, d) = _compute_dtype(query), keys.shape[1], query.shape
    q, pk, pv, k, v = _operands(query, prompt_keys, prompt_values, keys, values, dtype)
    d_out = _head_major(grad_out.to(dtype).transpose(1, 2), kvh)                          # [kvh, B, rep, T, d]
    row = (d_out * _head_major(out.to(dtype).transpose(1, 2), kvh)).sum(-1, keepdim=True)  # rowsum(dO * O)
    prompt_scores, own_scores = _scores(q, pk, k, scale)
    prompt_probs = (prompt_scores - lse[..., None]).exp_()                                 # [kvh, B, rep, T, P]
    own_probs = (own_scores - lse[..., None]).exp_()                                       # [kvh, B, rep, T, T]
    del prompt_scores, own_scores

    p = pk.shape[1]
    flat_d_out, flat_prompt_probs = d_out.reshape(kvh, -1, d), prompt_probs.view(kvh, -1, p)
    d_prompt_values = torch.matmul(flat_prompt_probs.transpose(1, 2), flat_d_out)              # [kvh, P, d]
    d_values = torch.matmul(own_probs.transpose(-1, -2), d_out).sum(2)                         # [kvh, B, T, d]
    d_prompt_scores = prompt_probs.mul_(                                                       # dS, prompt part
        torch.matmul(flat_d_out, pv.transpose(1, 2)).view_as(prompt_probs) - row)
    d_own_scores = own_probs.mul_(torch.matmul(d_out, v.unsqueeze(2).transpose(-1, -2)) - row)
    flat_d_prompt_scores = d_prompt_scores.view(kvh, -1, p)
    d_q = (torch.matmul(flat_d_prompt_scores, pk).view_as(q)
           + torch.matmul(d_own_scores, k.unsqueeze(2))) * scale                              # [kvh, B, rep, T, d]
    d_prompt_keys = torch.matmul(flat_d_prompt_scores.transpose(1, 2), q.reshape(kvh, -1, d)) * scale
    d_keys = torch.matmul(d_own_scores.transpose(-1, -2), q).sum(2) * scale                     # [kvh, B, T, d]
    return (d_q.transpose(0, 1).reshape(b, h, t, d), d_prompt_keys.unsqueeze(0), d_prompt_values.unsqueeze(0),
            d_keys.transpose(0, 1), d_values.transpose(0, 1))


KERNELS = {"flash_cpu": _FlashCpu, "matmul": _Matmul}


def default_kernel(device: torch.device) -> str:
    """PyTorch's flash kernels hand out the log-sum-exp this needs only on CPU (other devices: "matmul")."""
    return "flash_cpu" if device.type == "cpu" else "matmul"


def _compute_dtype(query: torch.Tensor) -> torch.dtype:
    return torch.promote_types(query.dtype, torch.float32)


def _operands(query, prompt_keys, prompt_values, keys, values, dtype):
    """The inputs in `dtype` and head-major: q [kvh, B, rep, T, d], prompt K/V [kvh, P, d], own K/V [kvh, B, T, d]."""
    kvh = keys.shape[1]
    return (_head_major(query.to(dtype), kvh), prompt_keys[0].to(dtype), prompt_values[0].to(dtype),
            keys.to(dtype).transpose(0, 1), values.to(dtype).transpose(0, 1))


def _head_major(tensor: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, H, T, d] -> [kvh, B, rep, T, d] (query head h uses K/V head h // rep, as in `repeat_kv`)."""
    b, h, t, d = tensor.shape
    return tensor.view(b, kv_heads, h // kv_heads, t, d).transpose(0, 1)


def _scores(q: torch.Tensor, prompt_keys: torch.Tensor, keys: torch.Tensor, scale: float):
    """q [kvh, B, rep, T, d], prompt_keys [kvh, P, d], keys [kvh, B, T, d]
    -> prompt scores [kvh, B, rep, T, P], own scores [kvh, B, rep, T, T] (-inf above the diagonal)."""
    kvh, b, rep, t, d = q.shape
    prompt = torch.matmul(q.reshape(kvh, b * rep * t, d), prompt_keys.transpose(1, 2)).view(kvh, b, rep, t, -1)
    own = torch.matmul(q, keys.unsqueeze(2).transpose(-1, -2))
    future = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
    return prompt * scale, (own * scale).masked_fill(future, float("-inf"))


def _shared_prompt_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                                     shared_prompt_kv=None, **kwargs):
    """transformers' attention interface: query [B, H, T, d], key/value [B, kvh, T, d] (the completions'
    own, no cache) -> ([B, T, H, d], None). The mask transformers builds is not used: the rule (whole
    prompt, own tokens causally) is fixed."""
    if shared_prompt_kv is None:
        raise ValueError("the shared-prompt attention needs shared_prompt_kv (one (keys, values) pair per layer)")
    if dropout:
        raise ValueError(f"the shared-prompt attention has no attention dropout (got {dropout}); "
                         "set the model's attention_dropout to 0 or group_sharing to encoders")
    prompt_keys, prompt_values = shared_prompt_kv[module.layer_idx]
    scale = module.head_dim ** -0.5 if scaling is None else scaling
    return SharedPromptAttention.apply(query, prompt_keys, prompt_values, key, value, scale), None


AttentionInterface.register(SHARED_PROMPT_ATTENTION, _shared_prompt_attention_forward)


def prompt_attention(decoder):
    """Route the language model's attention through `SharedPromptAttention` for a while (replays included)."""
    return attention_implementation(decoder, SHARED_PROMPT_ATTENTION)


# ---- decoding G continuations of one prompt without copying its K/V G times ------------------------------
#
# `generate` keeps G copies of the prompt's keys/values and, every step, concatenates each layer's
# whole cache again and attends each completion to its own copy. Here the prompt K/V are kept once
# ([kv_heads, P, d]); each step the G x heads queries attend to them in one matmul, and to the
# completions' own K/V (a preallocated [kv_heads, G, C, d] buffer), with one softmax over both —
# the same attention, without the G copies and the per-step re-concatenation.

SHARED_PREFIX_ATTENTION = "echoink_shared_prefix"


class _SharedPrefixLayer(DynamicLayer):
    """One layer's prompt K/V (once) + the completions' own K/V (written in place, never re-concatenated).

    Layouts: prompt [kv_heads, P, d]; own [kv_heads, G, capacity, d] (head-major, so that the
    attention below needs no transposes).
    """

    def __init__(self, prompt_keys: torch.Tensor, prompt_values: torch.Tensor, batch: int, capacity: int) -> None:
        super().__init__()
        self.lazy_initialization(prompt_keys, prompt_values)
        self.prompt_keys, self.prompt_values = prompt_keys[0], prompt_values[0]      # [kv_heads, P, d]
        shape = (prompt_keys.shape[1], batch, capacity, prompt_keys.shape[3])
        self.own_keys, self.own_values = prompt_keys.new_empty(shape), prompt_values.new_empty(shape)
        self.length = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """key/value_states [G, kv_heads, n, d] -> this layer's own K/V so far, [kv_heads, G, t, d]."""
        end = self.length + key_states.shape[-2]
        self.own_keys[:, :, self.length:end] = key_states.transpose(0, 1)
        self.own_values[:, :, self.length:end] = value_states.transpose(0, 1)
        self.length = end
        return self.own_keys[:, :, :end], self.own_values[:, :, :end]

    def get_seq_length(self) -> int:
        return self.prompt_keys.shape[-2] + self.length


class SharedPrefixCache(Cache):
    """A prefilled cache of ONE prompt, decoded `batch` ways (use with `shared_prefix_attention`)."""

    def __init__(self, prefilled: Cache, batch: int, capacity: int) -> None:
        super().__init__(layers=[_SharedPrefixLayer(layer.keys, layer.values, batch, capacity)
                                 for layer in prefilled.layers])


def _shared_prefix_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                                     shared_prefix: SharedPrefixCache | None = None, **kwargs):
    """One new token per completion attends to [shared prompt K/V, its own K/V]: -> [G, 1, heads, d].

    query [G, heads, 1, d]; key/value: the layer's own K/V [kv_heads, G, t, d] (from `update`).
    Query head h uses K/V head h // rep, as in `repeat_kv`.
    """
    if shared_prefix is None or query.shape[2] != 1:  # not a shared-prefix decode step: plain sdpa
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    layer = shared_prefix.layers[module.layer_idx]
    g, heads, _, d = query.shape
    kv_heads, p = layer.prompt_keys.shape[0], layer.prompt_keys.shape[1]
    q = (query * scaling).view(g, kv_heads, heads // kv_heads, d).transpose(0, 1)       # [kvh, G, rep, d]
    prompt_scores = torch.matmul(q.reshape(kv_heads, -1, d), layer.prompt_keys.transpose(1, 2))  # [kvh, G*rep, P]
    own_scores = torch.matmul(q, key.transpose(2, 3))                                   # [kvh, G, rep, t]
    scores = torch.cat([prompt_scores.view(kv_heads, g, -1, p), own_scores], dim=-1)    # [kvh, G, rep, P + t]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs[..., :p].reshape(kv_heads, -1, p), layer.prompt_values)   # [kvh, G*rep, d]
    out = out.view(kv_heads, g, -1, d) + torch.matmul(probs[..., p:], value)            # [kvh, G, rep, d]
    return out.transpose(0, 1).reshape(g, 1, heads, d), None


AttentionInterface.register(SHARED_PREFIX_ATTENTION, _shared_prefix_attention_forward)


def shared_prefix_attention(decoder):
    """Route the language model's attention through `_shared_prefix_attention_forward` for a while."""
    return attention_implementation(decoder, SHARED_PREFIX_ATTENTION)
