"""harness.nets.attention: backends agree with an independent reference; bad names and unavailable
backends fail loudly."""

import math

import pytest
import torch

from harness.nets import attention as attn_mod
from harness.nets.attention import BACKENDS, attention, check_backend, register_backend


def reference(q, k, v):
    # Straight-line softmax attention in float64, written independently of the module.
    q, k, v = q.double(), k.double(), v.double()
    logits = torch.einsum("bhnd,bhmd->bhnm", q, k) / math.sqrt(q.shape[-1])
    logits = logits - logits.amax(dim=-1, keepdim=True)
    weights = logits.exp() / logits.exp().sum(dim=-1, keepdim=True)
    return torch.einsum("bhnm,bhmd->bhnd", weights, v)


SHAPES = [(2, 1, 16, 8), (3, 4, 7, 16), (1, 2, 33, 64), (2, 3, 100, 5)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_backend_matches_reference(shape, backend):
    gen = torch.Generator().manual_seed(sum(shape))
    q, k, v = (torch.randn(*shape, generator=gen) * 2 for _ in range(3))
    out = attention(q, k, v, backend=backend)
    assert out.shape == shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_math_and_sdpa_agree(shape):
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(*shape, generator=gen) for _ in range(3))
    torch.testing.assert_close(attention(q, k, v, "math"), attention(q, k, v, "sdpa"), atol=1e-5, rtol=1e-5)


def test_scale_is_one_over_sqrt_head_dim():
    # With k = q along one direction, the largest logit is |q|^2 / sqrt(d); check one entry by hand.
    q = torch.zeros(1, 1, 2, 4)
    q[0, 0, 0, 0], q[0, 0, 1, 1] = 2.0, 2.0
    v = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]).reshape(1, 1, 2, 4)
    out = attention(q, q, v, "math")
    p = math.exp(4 / 2) / (math.exp(4 / 2) + 1)  # logits 4/sqrt(4) and 0
    assert out[0, 0, 0, 0].item() == pytest.approx(p, rel=1e-6)


def test_math_keeps_input_dtype_and_computes_in_float32():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 9, 8, generator=gen) for _ in range(3))
    out = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), "math")
    assert out.dtype == torch.bfloat16
    expected = reference(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float())
    torch.testing.assert_close(out.double(), expected, atol=2e-2, rtol=2e-2)


def test_unknown_backend_names_valid_ones():
    q = torch.randn(1, 1, 4, 4)
    with pytest.raises(ValueError, match=r"unknown attention backend 'foo'; valid: math, sdpa, xformers, jvp_flash"):
        attention(q, q, q, backend="foo")
    with pytest.raises(ValueError, match="valid: math, sdpa, xformers, jvp_flash"):
        check_backend("foo")


def test_bad_layout_is_rejected():
    q = torch.randn(4, 4, 4)
    with pytest.raises(ValueError, match="head_dim"):
        attention(q, q, q, backend="math")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error path")
def test_xformers_without_cuda_is_a_clear_error():
    q = torch.randn(1, 1, 4, 8)
    for call in (lambda: attention(q, q, q, backend="xformers"), lambda: check_backend("xformers")):
        with pytest.raises((RuntimeError, ValueError), match="xformers") as err:
            call()
        message = str(err.value)
        assert "CUDA" in message and "valid: math, sdpa, xformers" in message
        assert "\n" not in message


def test_xformers_with_cpu_tensors_is_an_error_even_if_cuda_exists(monkeypatch):
    # Pretend CUDA and xformers are present; CPU tensors must still be refused, not silently rerouted.
    monkeypatch.setattr(attn_mod, "_xformers_unavailable_reason", lambda: None)
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        attention(q, q, q, backend="xformers")


def test_check_backend_accepts_exactly_the_backends_that_run_here():
    """math and sdpa pass the check everywhere; every backend the check accepts computes attention here
    (equal to math), and every one it refuses fails when called."""
    q = torch.randn(1, 2, 5, 4)
    accepted = []
    for name in BACKENDS:
        try:
            check_backend(name)
        except (ValueError, RuntimeError):
            with pytest.raises((ValueError, RuntimeError)):
                attention(q, q, q, backend=name)
            continue
        accepted.append(name)
        torch.testing.assert_close(attention(q, q, q, backend=name), attention(q, q, q, backend="math"))
    assert {"math", "sdpa"} <= set(accepted)


def test_register_backend_refuses_duplicates_and_adds_new(monkeypatch):
    monkeypatch.setattr(attn_mod, "BACKENDS", dict(BACKENDS))
    with pytest.raises(ValueError, match="already registered"):
        register_backend("sdpa", lambda q, k, v: q)
    calls = []

    def doubled(q, k, v):
        calls.append(q.shape)
        return 2 * attn_mod.BACKENDS["math"](q, k, v)

    register_backend("doubled", doubled)
    q = torch.randn(1, 2, 5, 4)
    torch.testing.assert_close(attention(q, q, q, backend="doubled"), 2 * attention(q, q, q, backend="math"))
    assert calls == [q.shape]
    with pytest.raises(ValueError, match="already registered"):
        register_backend("doubled", doubled)
    assert "doubled" not in BACKENDS  # the real registry was left alone
