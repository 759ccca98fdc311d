"""SharedPromptAttention: the "full" log-prob path's attention to one shared prompt K/V, with gradient."""

import pytest
import torch
import torch.nn.functional as F

from echoink.model.attention import SharedPromptAttention

B, HEADS, KV_HEADS, T, P, D = 3, 4, 2, 5, 7, 8
SCALE = 0.3


def inputs(dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def leaf(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype).requires_grad_()
    return (leaf(B, HEADS, T, D), leaf(1, KV_HEADS, P, D), leaf(1, KV_HEADS, P, D),
            leaf(B, KV_HEADS, T, D), leaf(B, KV_HEADS, T, D))


def concatenated_attention(query, prompt_keys, prompt_values, keys, values):
    """The reference: sdpa over [prompt K/V copied B ways, own K/V] with the prompt + causal mask."""
    allowed = torch.ones(T, P + T, dtype=torch.bool)
    allowed[:, P:] = allowed[:, P:].tril()
    all_keys = torch.cat([prompt_keys.expand(B, -1, -1, -1), keys], dim=2)
    all_values = torch.cat([prompt_values.expand(B, -1, -1, -1), values], dim=2)
    out = F.scaled_dot_product_attention(query, all_keys, all_values, attn_mask=allowed, scale=SCALE,
                                         enable_gqa=True)
    return out.transpose(1, 2)                                                            # [B, T, H, d]


KERNELS = ["flash_cpu", "matmul"]


@pytest.mark.parametrize("kernel", KERNELS)
def test_gradients_match_finite_differences(kernel):
    assert torch.autograd.gradcheck(lambda *a: SharedPromptAttention.apply(*a, SCALE, kernel), inputs())


@pytest.mark.parametrize("kernel", KERNELS)
def test_equals_attention_over_the_concatenated_keys(kernel):
    ours, reference = inputs(), inputs()
    out = SharedPromptAttention.apply(*ours, SCALE, kernel)
    expected = concatenated_attention(*reference)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    for mine, theirs in zip(ours, reference):   # the prompt's gradient is summed over the B completions
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lower_precision_inputs_give_their_dtype_back(dtype, kernel):
    """Scores are accumulated in float32: bfloat16 results are the float64 ones rounded."""
    low = [tensor.detach().to(dtype).requires_grad_() for tensor in inputs()]
    out = SharedPromptAttention.apply(*low, SCALE, kernel)
    assert out.dtype == dtype
    exact = concatenated_attention(*[tensor.detach().double() for tensor in low])
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), exact, rtol=tolerance, atol=tolerance)
    out.float().sum().backward()
    assert all(tensor.grad.dtype == dtype for tensor in low)


@pytest.mark.parametrize("kernel", KERNELS)
def test_the_prompt_kv_is_kept_once_not_per_completion(kernel):
    """What backward keeps: q, the prompt K/V once, own K/V, the output and the row log-sum-exp — never
    a [B, kv_heads, P + T, d] copy of the prompt's keys."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        query, prompt_keys, prompt_values, keys, values = inputs()
        SharedPromptAttention.apply(query, prompt_keys, prompt_values, keys, values, SCALE, kernel)
    assert len(saved) == 7
    assert {tensor.data_ptr() for tensor in saved[:5]} == {t.data_ptr() for t in (query, prompt_keys, prompt_values,
                                                                                    keys, values)}
    assert max(tensor.numel() for tensor in saved) == B * HEADS * T * D


@pytest.mark.parametrize("kernel", KERNELS)
def test_mixed_input_dtypes_as_under_autocast(kernel):
    """Under autocast, rotary embeddings leave q / K in float32 while V stays bfloat16: computed in the wider
    dtype, each gradient comes back in its input's dtype."""
    query, prompt_keys, prompt_values, keys, values = [t.detach().float() for t in inputs()]
    mixed = [query, prompt_keys, prompt_values.bfloat16(), keys, values.bfloat16()]
    mixed = [tensor.requires_grad_() for tensor in mixed]
    out = SharedPromptAttention.apply(*mixed, SCALE, kernel)
    exact = concatenated_attention(*[tensor.detach().double() for tensor in mixed])
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert [tensor.grad.dtype for tensor in mixed] == [tensor.dtype for tensor in mixed]
