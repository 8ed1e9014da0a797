"""sCM additions: sCD's classifier-free guidance with the scale as a student input, label dropout for the
teachers, the teacher-method check, and the sCM network changes (adaptive double normalization,
positional time embedding, float32 time embedding under low precision)."""
import dataclasses

import pytest
import torch
from torch import nn

from harness.config import ConfigError, compose
from harness.nets import build_net, get_preset
from methods.base import StepContext
from methods.common import drop_labels
from methods.scm import SCD, SCDConfig

SD, SHAPE, CLASSES = 0.5, (1, 4, 4), 3


class CondNet(nn.Module):
    """F depends on the one-hot label (all-zero = null) and on the extra input, so CFG is visible."""

    def __init__(self, extra: bool):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(16 + 1 + CLASSES + int(extra), 16)
        self.extra = extra

    def forward(self, x, c_noise, labels=None, extra=None, return_logvar=False):
        onehot = labels.float() if labels.is_floating_point() else nn.functional.one_hot(labels, CLASSES).float()
        parts = [x.flatten(1), c_noise.reshape(-1, 1), onehot] + ([extra] if self.extra else [])
        out = torch.tanh(self.lin(torch.cat(parts, 1))).reshape(x.shape)
        return (out, torch.zeros(x.shape[0])) if return_logvar else out


def _ctx(student, teacher, seed=4):
    return StepContext(net=student, net_nograd=student, teacher=teacher, step=5, total_steps=100,
                       generator=torch.Generator().manual_seed(seed))


def test_scd_guided_teacher_velocity_is_cfg_at_the_student_scale():
    teacher, student = CondNet(extra=False), CondNet(extra=True)
    scd = SCD(SCDConfig(guidance_max=2.0, adaptive_weight=False, tangent_norm="none"), SHAPE, CLASSES)
    ctx = _ctx(student, teacher)
    x_t, t = torch.randn(6, *SHAPE), torch.rand(6) * 1.5
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    extra = scd.student_extra(ctx, 6, "cpu")
    s = extra.reshape(-1)
    assert extra.shape == (6, 1) and bool(((s >= 1) & (s <= 2)).all()) and s.std() > 0
    v = scd.velocity(ctx, None, None, x_t, t, y, extra)
    v_c = SD * teacher(x_t / SD, t, y)
    v_u = SD * teacher(x_t / SD, t, torch.zeros(6, CLASSES))
    expected = v_u + s.reshape(-1, 1, 1, 1) * (v_c - v_u)
    torch.testing.assert_close(v, expected)
    # scale 1 is plain conditional distillation; without guidance the extra input is absent
    torch.testing.assert_close(scd.velocity(ctx, None, None, x_t, t, y, torch.ones(6, 1)), v_c)
    plain = SCD(SCDConfig(adaptive_weight=False), SHAPE, CLASSES)
    assert plain.student_extra(ctx, 6, "cpu") is None


def test_scd_guided_loss_and_sampler_feed_the_scale_to_the_student():
    teacher, student = CondNet(extra=False), CondNet(extra=True)
    seen = []
    def record(module, args, kwargs, out):
        seen.append((args[3] if len(args) > 3 else kwargs["extra"]).detach().clone())
    hook = student.register_forward_hook(record, with_kwargs=True)
    scd = SCD(SCDConfig(guidance_max=2.0, guidance_scale=1.5, adaptive_weight=False), SHAPE, CLASSES)
    out = scd.loss(_ctx(student, teacher), {"x": torch.rand(4, *SHAPE), "y": torch.tensor([0, 1, 2, 1])})
    assert torch.isfinite(out["loss"])
    # the JVP pass and the gradient pass see the same per-sample scale
    torch.testing.assert_close(seen[0], seen[-1])
    assert bool((seen[0] >= 1).all() and (seen[0] <= 2).all())
    seen.clear()
    scd.sample(student, torch.randn(4, *SHAPE), 2, torch.tensor([0, 1, 2, 1]), torch.Generator().manual_seed(0))
    assert len(seen) == 2 and all(bool((e == 1.5).all()) for e in seen)
    hook.remove()


def test_drop_labels_replaces_rows_with_the_null_label_at_rate_p():
    y = torch.randint(CLASSES, (20000,), generator=torch.Generator().manual_seed(0))
    out = drop_labels(y, CLASSES, 0.1, torch.Generator().manual_seed(1))
    null = out.sum(dim=1) == 0
    assert abs(null.float().mean().item() - 0.1) < 0.01
    assert torch.equal(out[~null].argmax(dim=1), y[~null])
    assert drop_labels(y, CLASSES, 0.0, torch.Generator()) is y


def test_guidance_config_errors():
    base = ["method=scd", "model.logvar=true", "teacher=runs/none", "method.guidance_max=2"]
    # the method sets the second input it needs; built directly on a network config without one, it refuses
    assert compose([*base, "data.class_conditional=true"]).model.extra_cond_dim == 1
    with pytest.raises(ValueError, match="set model.extra_cond_dim=1"):
        SCD.check_model(SCDConfig(guidance_max=2), {"logvar": True, "extra_cond_dim": 0})
    with pytest.raises(ConfigError, match="needs class-conditional data"):
        compose([*base, "model.extra_cond_dim=1"])
    with pytest.raises(ConfigError, match="guidance_scale <= max"):
        compose([*base, "model.extra_cond_dim=1", "data.class_conditional=true", "method.guidance_scale=3"])
    with pytest.raises(ConfigError, match="label_dropout must lie in"):
        compose(["method=trigflow", "method.label_dropout=1.0"])
    assert compose([*base, "model.extra_cond_dim=1", "data.class_conditional=true"]).method.guidance_max == 2


def _finished_run(tmp_path, name, method, *extra):
    from harness.train.cli import run
    cfg = compose([f"method={method}", "data=digits", "model=unet-xs", "trainer.steps=2", "trainer.batch_size=8",
                   "trainer.threads=1", "eval.at_end=false", *extra, f"run_dir={tmp_path / name}"])
    assert run(cfg)["status"] == "completed"
    return str(tmp_path / name)


def test_a_teacher_of_the_wrong_method_is_refused_before_any_work(tmp_path, capsys):
    from harness.train.cli import main
    edm = _finished_run(tmp_path, "edm", "edm")
    rc = main(["method=scd", "model=unet-xs", "model.logvar=true", f"teacher={edm}",
               "--out", str(tmp_path / 'student')])
    assert rc == 2
    assert "is a edm run; scd needs a teacher trained with method=trigflow" in capsys.readouterr().err
    assert not (tmp_path / "student").exists()


# ------------------------------------------------------------------ network flags


def _block_inputs(channels, emb_channels, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, channels, 4, 4, generator=gen), torch.randn(2, emb_channels, generator=gen)


def test_ddpmpp_double_norm_block_matches_the_formula():
    from harness.nets.ddpmpp import UNetBlock
    cfg = dataclasses.replace(get_preset("ddpmpp-xs"), double_norm=True, dropout=0.0)
    torch.manual_seed(0)
    block = UNetBlock(cfg, 16, 16, 32, 4)
    with torch.no_grad():
        block.conv1.weight.normal_()           # undo the near-zero init so the branch is visible
    x, emb = _block_inputs(16, 32)
    s, b = block.affine(emb).chunk(2, dim=1)
    pn = lambda v: v / torch.sqrt(v.pow(2).mean(dim=1, keepdim=True) + 1e-8)       # PGGAN pixel norm
    h = block.conv0(nn.functional.silu(block.norm0(x)))
    h = nn.functional.silu(block.norm1(h) * pn(s)[:, :, None, None] + pn(b)[:, :, None, None])
    expected = (block.conv1(h) + x) * 2 ** -0.5
    torch.testing.assert_close(block(x, emb), expected)
    # the modulation is invariant to the scale of the embedding projection (what stabilizes CM training)
    with torch.no_grad():
        block.affine.weight.mul_(7.0)
        block.affine.bias.mul_(7.0)
    torch.testing.assert_close(block(x, emb), expected, rtol=1e-4, atol=1e-5)


def test_unet_double_norm_block_matches_the_formula():
    """sCM's double normalization on the EDM2 decoder block, written here with torch primitives only:
    y = MP-SiLU(norm_c(conv0(MP-SiLU(x))) * pn(s) + pn(b)), out = MP-Sum(x, conv1(y), t)."""
    from harness.nets.unet import Block
    cfg = dataclasses.replace(get_preset("unet-xs"), double_norm=True)
    torch.manual_seed(0)
    block = Block(cfg, 16, 16, 32, 4, "dec")
    x, emb = _block_inputs(16, 32)
    assert not hasattr(block, "emb_gain")       # no unused parameter for DeepSpeed to choke on
    silu = lambda v: nn.functional.silu(v) / 0.596                              # EDM2 config G, MP-SiLU
    norm_c = lambda v: v / (1e-4 + v.norm(dim=1, keepdim=True) / v.shape[1] ** 0.5)    # EDM2, eps 1e-4
    pn = lambda v: v / torch.sqrt(v.pow(2).mean(dim=1, keepdim=True) + 1e-8)       # PGGAN pixel norm
    t = cfg.res_balance
    s, b = block.emb_linear(emb).chunk(2, dim=1)
    y = block.conv_res0(silu(x))
    y = silu(norm_c(y) * pn(s)[:, :, None, None] + pn(b)[:, :, None, None])
    expected = ((1 - t) * x + t * block.conv_res1(y)) / ((1 - t) ** 2 + t**2) ** 0.5  # EDM2 MP-Sum
    torch.testing.assert_close(block(x, emb), expected)


@pytest.mark.parametrize("name", ["unet-xs", "ddpmpp-xs"])
def test_scm_network_flags_train_under_jvp(name):
    """Positional time embedding + double norm + extra input: the rearranged JVP is finite and equals a
    central difference (float64)."""
    overrides = {"double_norm": True, "extra_cond_dim": 1, "logvar": True}
    overrides["noise_embedding" if name.startswith("unet") else "embedding_type"] = "positional"
    cfg = dataclasses.replace(get_preset(name), **overrides)
    torch.manual_seed(0)
    net = build_net(cfg, (1, 8, 8), 0).double()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))  # move zero-init gains so the output depends on everything
    net.eval()
    x, t, e = torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.tensor([0.4, 1.2], dtype=torch.float64), \
        torch.full((2, 1), 1.5, dtype=torch.float64)
    dx = torch.randn_like(x)
    _, tangent = torch.func.jvp(lambda u, tt: net(u, tt, None, e), (x, t), (dx, torch.ones_like(t)))
    h = 1e-3    # the nets embed t in float32 (on purpose), so a float64 step in t must not be tiny
    fd = (net(x + h * dx, t + h, None, e) - net(x - h * dx, t - h, None, e)) / (2 * h)
    assert torch.isfinite(tangent).all() and tangent.abs().max() > 1e-3
    assert (tangent - fd).abs().max() < 1e-3 * tangent.abs().max()


@pytest.mark.parametrize("name", ["unet-xs", "ddpmpp-xs", "dit-xs"])
def test_time_embedding_stays_float32_in_a_bfloat16_network(name):
    """The time embedding runs in float32 under low precision [sCM §4.1 / App. G]: a bf16 copy of a net
    embeds t exactly as the fp32 net does (same frequencies, float32 output), for t near pi/2 too."""
    torch.manual_seed(0)
    net = build_net(get_preset(name), (1, 8, 8), 0)
    half = build_net(get_preset(name), (1, 8, 8), 0)
    half.load_state_dict(net.state_dict())
    half = half.bfloat16()
    emb_name = {"unet": "emb_fourier", "ddpmpp": "map_noise", "dit": "noise_embed"}[name.split("-")[0]]
    emb32, emb16 = getattr(net, emb_name), getattr(half, emb_name)
    t = torch.tensor([0.0, 0.7, 1.5645])
    if name.startswith("dit"):      # the embedder includes its MLP: compare its sinusoid stage
        emb32, emb16 = emb32.embed, emb16.embed
    a, b = emb32(t), emb16(t)
    assert b.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=0, atol=0)
