"""jvp_flash attention: the blockwise online-softmax JVP against a straight-line N x N formula and against
torch.func.jvp over `math` attention, gradients through the primal, and whole networks under torch.func.jvp."""
import math

import pytest
import torch
from torch.func import jvp

from harness.nets.attention import attention
from harness.nets.jvp_attention import attention_jvp_blockwise
from tests.test_nets import WITH_ATTENTION, inputs, make, perturb


def _rand(*shape, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=dtype) for _ in range(6)]


def _straight_line(q, k, v, tq, tk, tv):
    # Materialized scores and their tangent: t_p = p * (t_x - <p, t_x>), t_y = t_p V + p t_V.
    kappa = 1 / math.sqrt(q.shape[-1])
    x = kappa * q @ k.transpose(-2, -1)
    tx = kappa * (tq @ k.transpose(-2, -1) + q @ tk.transpose(-2, -1))
    p = torch.softmax(x, dim=-1)
    tp = p * (tx - (p * tx).sum(-1, keepdim=True))
    return p @ v, tp @ v + p @ tv


@pytest.mark.parametrize("n,d,block", [(1, 8, 128), (7, 8, 4), (128, 64, 128), (129, 16, 128), (300, 32, 64)])
def test_blockwise_jvp_matches_the_materialized_formula(n, d, block):
    q, k, v, tq, tk, tv = _rand(2, 3, n, d)
    y, ty = attention_jvp_blockwise(q, k, v, tq, tk, tv, block=block)
    y_ref, ty_ref = _straight_line(q, k, v, tq, tk, tv)
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(ty, ty_ref, atol=1e-12, rtol=1e-10)


def test_blockwise_jvp_matches_finite_differences():
    q, k, v, tq, tk, tv = _rand(1, 2, 33, 8, seed=3)
    _, ty = attention_jvp_blockwise(q, k, v, tq, tk, tv, block=8)
    h = 1e-6
    plus = _straight_line(q + h * tq, k + h * tk, v + h * tv, tq, tk, tv)[0]
    minus = _straight_line(q - h * tq, k - h * tk, v - h * tv, tq, tk, tv)[0]
    torch.testing.assert_close(ty, (plus - minus) / (2 * h), atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("n,d", [(5, 8), (64, 64), (130, 16), (257, 32)])
def test_func_jvp_through_the_backend_equals_math_attention(n, d):
    q, k, v, tq, tk, tv = _rand(2, 4, n, d, seed=n, dtype=torch.float32)

    def run(backend):
        return jvp(lambda a, b, c: attention(a, b, c, backend), (q, k, v), (tq, tk, tv))

    (y_ref, t_ref), (y, t) = run("math"), run("jvp_flash")
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t, t_ref, atol=1e-5, rtol=1e-5)


def test_gradients_flow_through_the_primal_output():
    q, k, v, *_ = _rand(2, 2, 40, 16, seed=9, dtype=torch.float32)
    w = torch.randn(2, 2, 40, 16, generator=torch.Generator().manual_seed(1))
    grads = {}
    for backend in ("math", "jvp_flash"):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        grads[backend] = torch.autograd.grad((attention(*leaves, backend) * w).sum(), leaves)
    for a, b in zip(grads["math"], grads["jvp_flash"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", [n for n in WITH_ATTENTION if n.endswith(("xs", "-s"))])
def test_whole_network_jvp_equals_math_attention(name):
    outs = {}
    for backend in ("math", "jvp_flash"):
        net = perturb(make(name, attention=backend)).eval()
        x, noise, _, _ = inputs(net)
        gen = torch.Generator().manual_seed(4)
        tangents = (torch.randn(x.shape, generator=gen), torch.ones(noise.shape))
        with torch.no_grad():
            outs[backend] = jvp(lambda a, b: net(a, b), (x, noise), tangents)
    torch.testing.assert_close(outs["jvp_flash"][0], outs["math"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs["jvp_flash"][1], outs["math"][1], atol=1e-5, rtol=1e-4)
    assert outs["math"][1].abs().max() > 1e-3                 # the tangent is not trivially zero
