"""SCT (stable_ct): the variance-reduced target against ECT's, against a straight-line loop written here,
and its limits (uniform weights at large t, one-hot at small t), chunking and class restriction."""
import math

import pytest
import torch

import methods
from methods.ect import ECT, ECTConfig
from methods.stable_ct import StableCT, StableCTConfig, posterior_mean
from tests.test_ect import TinyNet, _ctx


def loop_posterior(x_t, t, ref, y=None, ref_y=None):
    """Straight-line SCT Theorem 1 in float64, one sample at a time: W_j = softmax_j(-||x_t - x0_j||^2 / (2 t^2))
    over the (same-class) references; returns xbar0 = sum_j W_j x0_j and the ESS 1 / sum_j W_j^2."""
    xbars, esss = [], []
    for i in range(x_t.shape[0]):
        keep = [j for j in range(ref.shape[0]) if y is None or ref_y[j] == y[i]]
        logw = torch.stack([-((x_t[i].double() - ref[j].double()) ** 2).sum() / (2 * float(t[i]) ** 2) for j in keep])
        w = torch.softmax(logw, dim=0)
        xbars.append(sum(w[k] * ref[j].double() for k, j in enumerate(keep)))
        esss.append(1.0 / (w ** 2).sum())
    return torch.stack(xbars), torch.stack(esss)


def _batch(n=12, seed=0, shape=(1, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *shape, generator=g) * 2 - 1


def test_registered():
    assert methods.get("stable_ct") is StableCT
    assert StableCTConfig().weighting == "inv_dt_delta" and StableCTConfig().reference == "batch"


def test_weights_and_target_match_loop():
    x0 = _batch(10).flatten(1)
    g = torch.Generator().manual_seed(1)
    t = torch.tensor([0.3, 0.8, 1.5, 3.0, 6.0, 0.5, 2.0, 1.0, 4.0, 10.0])
    x_t = x0 + t[:, None] * torch.randn(x0.shape, generator=g)
    xbar, ess, count = posterior_mean(x_t, t, [(x0, None)])
    ref_xbar, ref_ess = loop_posterior(x_t, t, x0)
    torch.testing.assert_close(xbar.double(), ref_xbar, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ess.double(), ref_ess, rtol=1e-4, atol=1e-5)
    assert count.tolist() == [10] * 10
    assert 1.5 < ess.max() and ess.min() < 1.5      # the cases span spread and concentrated weights


def test_uniform_at_large_t_and_one_hot_at_small_t():
    x0 = _batch(16).flatten(1)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    big = torch.full((16,), 1e4)
    xbar, ess, count = posterior_mean(x0 + big[:, None] * eps, big, [(x0, None)])
    assert (ess / count).min() > 0.999                                # W -> 1/n
    torch.testing.assert_close(xbar, x0.mean(0).expand_as(xbar), rtol=0, atol=1e-3)
    small = torch.full((16,), 1e-3)
    xbar, ess, _ = posterior_mean(x0 + small[:, None] * eps, small, [(x0, None)])
    assert torch.equal(ess, torch.ones(16)) and torch.equal(xbar, x0)  # W = one-hot on the own x0


def test_chunked_bank_equals_one_chunk():
    bank = _batch(37, seed=3).flatten(1)
    labels = torch.arange(37) % 3
    x0, y = bank[[0, 5, 9, 20, 36]], labels[[0, 5, 9, 20, 36]]
    t = torch.tensor([0.4, 1.0, 2.5, 8.0, 0.7])
    x_t = x0 + t[:, None] * torch.randn(x0.shape, generator=torch.Generator().manual_seed(4))
    for ref_y, yy in ((None, None), (labels, y)):
        whole = posterior_mean(x_t, t, [(bank, ref_y)], yy)
        chunks = [(bank[i:i + 5], ref_y[i:i + 5] if ref_y is not None else None) for i in range(0, 37, 5)]
        parts = posterior_mean(x_t, t, chunks, yy)
        for a, b in zip(whole, parts):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        loop = loop_posterior(x_t, t, bank, yy, ref_y)
        torch.testing.assert_close(parts[0].double(), loop[0], rtol=1e-4, atol=1e-5)


def test_class_restriction_never_mixes_classes():
    # class 0 images are all -0.5, class 1 all +0.5 (plus small noise); at t = 50 the weights are near
    # uniform, so any mixing would pull xbar0 towards 0.
    g = torch.Generator().manual_seed(5)
    y = torch.tensor([0, 1, 0, 1, 1, 0, 2])
    x0 = (y.float()[:, None] - 0.5).clamp(max=0.5) * torch.ones(7, 64) + 0.01 * torch.randn(7, 64, generator=g)
    t = torch.full((7,), 50.0)
    x_t = x0 + t[:, None] * torch.randn(x0.shape, generator=g)
    # class 2 appears only in the last chunk: rows of that class see no reference in earlier chunks
    xbar, ess, count = posterior_mean(x_t, t, [(x0[:3], y[:3]), (x0[3:], y[3:])], y)
    for c in (0, 1, 2):
        rows, same = y == c, x0[y == c]
        lo, hi = same.min(0).values, same.max(0).values
        assert ((xbar[rows] >= lo - 1e-6) & (xbar[rows] <= hi + 1e-6)).all()   # convex hull of its class
    assert count.tolist() == [3, 3, 3, 3, 3, 3, 1]
    assert torch.equal(xbar[6], x0[6])                                     # a class of one: its own x0


def _cond_batch(n=8):
    return {"x": _batch(n, seed=6), "y": torch.arange(n)}                 # all labels distinct


@pytest.mark.parametrize("stage_step", [0, 500])
def test_own_x0_only_reference_equals_ect_exactly(stage_step):
    """Distinct labels with same_class: each reference set is the sample's own x0, so SCT is ECT bit for bit."""
    torch.manual_seed(0)
    net = TinyNet()
    batch = _cond_batch()
    ect = ECT(ECTConfig(p_mean=0.5), (1, 8, 8), 8).loss(_ctx(net, 11, stage_step), batch)
    sct_cfg = StableCTConfig(p_mean=0.5, weighting="inv_dt", delta=0.0)
    sct = StableCT(sct_cfg, (1, 8, 8), 8).loss(_ctx(net, 11, stage_step), batch)
    assert sct["loss"].item() == ect["loss"].item()
    g1 = torch.autograd.grad(ect["loss"], list(net.parameters()))
    g2 = torch.autograd.grad(sct["loss"], list(net.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert sct["stable_ct/ess_samples"].item() == 1.0 and sct["stable_ct/xbar0_shift"].item() == 0.0
    # a batch of one, unconditional: the same
    one = {"x": batch["x"][:1], "y": None}
    a = ECT(ECTConfig(p_mean=0.5), (1, 8, 8), 0).loss(_ctx(net, 12, stage_step), one)["loss"]
    b = StableCT(sct_cfg, (1, 8, 8), 0).loss(_ctx(net, 12, stage_step), one)["loss"]
    assert a.item() == b.item()


@pytest.mark.parametrize("stage_step,delta", [(0, 1e-3), (700, 0.05)])
def test_loss_matches_straight_line(stage_step, delta):
    torch.manual_seed(0)
    net = TinyNet()
    x0 = _batch(16, seed=7)
    cfg = StableCTConfig(p_mean=0.5, p_std=1.0, huber_c=0.03, delta=delta)
    out = StableCT(cfg, (1, 8, 8), 0).loss(_ctx(net, 7, stage_step), {"x": x0, "y": None})
    gen = torch.Generator().manual_seed(7)                 # same draws, same order as ECT: t, then eps
    t = (0.5 + 1.0 * torch.randn(16, generator=gen)).exp()
    eps = torch.randn(x0.shape, generator=gen)
    n = 1 + 8 / (1 + torch.exp(t))
    r = torch.clamp(t * (1 - n / 2.0 ** (stage_step // 100 + 1)), min=0)
    x_t = x0 + t.reshape(-1, 1, 1, 1) * eps
    xbar, ess = loop_posterior(x_t.flatten(1), t, x0.flatten(1))
    xbar = xbar.float().reshape(x0.shape)
    x_r = (r / t).reshape(-1, 1, 1, 1) * x_t + (1 - r / t).reshape(-1, 1, 1, 1) * xbar   # spec 4.2
    sd = 0.5

    def f(x, s):
        s4 = s.reshape(-1, 1, 1, 1)
        return sd ** 2 / (s4 ** 2 + sd ** 2) * x + s4 * sd / (s4 ** 2 + sd ** 2).sqrt() * net(
            x / (s4 ** 2 + sd ** 2).sqrt(), torch.log(s) / 4)

    with torch.no_grad():
        tgt = torch.where((r > 0).reshape(-1, 1, 1, 1), f(x_r, torch.where(r > 0, r, torch.ones_like(r))), xbar)
    dist = (((f(x_t, t) - tgt) ** 2).sum(dim=(1, 2, 3)) + 0.03 ** 2).sqrt() - 0.03
    ref = (dist / (t - r + delta)).mean()
    assert out["loss"].item() == pytest.approx(ref.item(), rel=1e-4)
    assert out["stable_ct/ess"].item() == pytest.approx((ess / 16).mean().item(), rel=1e-4)
    assert 1 / 16 < out["stable_ct/ess"].item() <= 1
    assert (out["stable_ct/frac_r0"].item() > 0) == (stage_step == 0)


def test_bank_mode_through_the_method_equals_batch_mode():
    torch.manual_seed(0)
    net = TinyNet()
    x0 = _batch(16, seed=8)
    base = dict(p_mean=0.8, p_std=0.5)
    batch_out = StableCT(StableCTConfig(**base), (1, 8, 8), 0).loss(_ctx(net, 3, 400), {"x": x0, "y": None})
    bank = StableCT(StableCTConfig(**base, reference="bank", bank_chunk=5), (1, 8, 8), 0)
    bank.attach_data(x0, None)                      # the training set is exactly this batch
    bank_out = bank.loss(_ctx(net, 3, 400), {"x": x0, "y": None})
    assert bank_out["loss"].item() == pytest.approx(batch_out["loss"].item(), rel=1e-5)
    assert bank_out["stable_ct/ess"].item() == pytest.approx(batch_out["stable_ct/ess"].item(), rel=1e-5)
    assert batch_out["stable_ct/ess_samples"].item() > 1.2          # the weights really spread here
    # a larger bank than the batch: more references per sample
    big = StableCT(StableCTConfig(**base, reference="bank", bank_chunk=7), (1, 8, 8), 0)
    big.attach_data(torch.cat([x0, _batch(40, seed=9)]), None)
    more = big.loss(_ctx(net, 3, 400), {"x": x0, "y": None})["stable_ct/ess_samples"]
    assert more > batch_out["stable_ct/ess_samples"]


def test_finite_loss_nonzero_grads_sample_and_state():
    torch.manual_seed(0)
    net = TinyNet()
    m = StableCT(StableCTConfig(), (1, 8, 8), 10)
    out = m.loss(_ctx(net, 1, 300), {"x": _batch(32), "y": torch.arange(32) % 10})
    assert math.isfinite(out["loss"].item())
    grads = torch.autograd.grad(out["loss"], list(net.parameters()))
    assert sum(g.abs().sum() for g in grads) > 0
    assert m.sample(net, torch.randn(5, 1, 8, 8), 2).shape == (5, 1, 8, 8)
    assert m.state_dict() == {}
    m.load_state_dict(m.state_dict())
    with pytest.raises(ValueError, match="has no state"):
        m.load_state_dict({"bank": 1})


@pytest.mark.parametrize("override,match", [
    ({"reference": "all"}, "unknown method.reference 'all'; valid: batch, bank"),
    ({"r0_target": "zero"}, "unknown method.r0_target 'zero'; valid: xbar0, x0"),
    ({"bank_chunk": 0}, "method.bank_chunk must be >= 1"),
    ({"delta": 0.0}, "needs method.delta > 0"),
    ({"q": 1.0}, "ECT needs method.q > 1"),
])
def test_config_errors_are_one_line(override, match):
    with pytest.raises(ValueError, match=match) as err:
        StableCT(StableCTConfig(**override), (1, 8, 8), 0)
    assert "\n" not in str(err.value)


def test_bank_without_data_and_bank_labels_errors():
    net = TinyNet()
    m = StableCT(StableCTConfig(reference="bank"), (1, 8, 8), 0)
    with pytest.raises(ValueError, match="needs the training set"):
        m.loss(_ctx(net, 0), {"x": _batch(4), "y": None})
    m.attach_data(_batch(20), None)
    with pytest.raises(ValueError, match="needs labels for the bank"):
        m.loss(_ctx(net, 0), {"x": _batch(4), "y": torch.arange(4)})


def test_presets_compose():
    from harness.config import ConfigError, compose
    cfg = compose(["method=stable_ct", "data=digits", "model=unet-xs"])
    assert cfg.method.preset == "tiny" and cfg.method.huber_c == pytest.approx(0.00054 * 8)
    assert cfg.method.weighting == "inv_dt_delta"
    for preset, q, stages in (("cifar10", 2.0, 8), ("imagenet64", 4.0, 4)):
        c = compose(["method=stable_ct", f"preset={preset}", "model=unet-xs"])
        assert (c.method.q, c.method.stages, c.method.weighting) == (q, stages, "inv_dt_delta")
    with pytest.raises(ConfigError, match="unknown method.reference 'x'"):
        compose(["method=stable_ct", "method.reference=x"])


def test_cifar10_recipe_is_sct_table_1_setup(cifar10_stub):
    from harness.config import compose
    cfg = compose(["recipe=stable-ct-cifar10", f"data.path={cifar10_stub}"])
    # SCT Table 1 note (128 x 200k), ECT Table 7 otherwise
    assert (cfg.model.name, cfg.model.dropout) == ("ddpmpp-cifar10", 0.2)
    t = cfg.trainer
    assert (t.optimizer, t.lr, t.batch_size, t.steps) == ("radam", 1e-4, 128, 200000)
    m = cfg.method
    assert (m.name, m.reference, m.weighting, m.huber_c, m.q, m.stages) == \
        ("stable_ct", "batch", "inv_dt_delta", 0.0, 2.0, 8)


def test_trainer_hands_the_training_set_to_the_bank(compose_run, tmp_path):
    """Through the real trainer: reference=bank on class-conditional digits gets the training set (the
    trainer's attach_data hook) and every sample's weights spread over same-class bank images."""
    import json

    from harness.train.cli import run
    cfg = compose_run("method=stable_ct", "method.reference=bank", "method.bank_chunk=500",
                      "data.class_conditional=true", "method.p_mean=1.0", "method.p_std=0.1",
                      "trainer.steps=3", "trainer.log_every_steps=1")
    assert run(cfg)["status"] == "completed"
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    ess = [r["stable_ct/ess_samples"] for r in rows if "loss" in r]
    assert len(ess) == 3 and min(ess) > 1.5         # t ~ e: several same-class digits share the weight
