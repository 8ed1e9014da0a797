"""CT, iCT and CD: curricula, index distributions, losses against straight-line code, CD's ODE step
against a Gaussian's exact PF-ODE, the target EMA, multistep sampling and LPIPS."""
import copy
import math

import pytest
import torch
from torch import nn

import methods
from harness.config import ConfigError, compose
from methods.base import StepContext
from methods.cm import (CD, CT, ICT, CDConfig, CTConfig, ICTConfig, ct_num_scales, ct_target_mu,
                        ict_index_probs, ict_num_scales, ode_step)
from methods.lpips import LPIPS, LIN_FILE, VGG_FILE, VGG_TAPS, load_lpips
from methods.sampling import consistency_sample

SHAPE = (1, 8, 8)


# -- curricula ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("k,n,mu", [(0, 2, 0.9), (200_000, 76, 0.99723), (400_000, 107, 0.99803),
                                    (800_000, 151, 0.99861)])
def test_ct_curriculum_matches_the_spec_table(k, n, mu):
    # spec B.4 [DERIVED, CIFAR-10, K = 800K]: s0 = 2, s1 = 150, mu0 = 0.9
    assert ct_num_scales(k, 800_000, 2, 150) == n
    assert ct_target_mu(n, 2, 0.9) == pytest.approx(mu, abs=5e-6)


def test_ct_curriculum_keeps_one_interval_when_s0_is_1():
    assert ct_num_scales(0, 100, 1, 150) == 2 and ct_num_scales(100, 100, 1, 150) == 151


def test_ct_target_mu_code_form_divides_by_n_minus_1():
    assert ct_target_mu(2, 2, 0.9, "n_minus_1") == pytest.approx(0.81)                # spec B.4
    assert ct_target_mu(151, 2, 0.9, "n_minus_1") == pytest.approx(math.exp(2 * math.log(0.9) / 150))


def test_ict_doubling_curriculum():
    # spec B.5: K = 400K, K' = 50000; N = 11, 21, ..., 1281 on consecutive blocks, capped at 1281
    values = [ict_num_scales(b * 50_000, 400_000, 10, 1280) for b in range(8)]
    assert values == [11, 21, 41, 81, 161, 321, 641, 1281]
    assert ict_num_scales(49_999, 400_000, 10, 1280) == 11
    assert ict_num_scales(400_000, 400_000, 10, 1280) == 1281
    assert ict_num_scales(3, 5, 10, 1280) == 10 * 2 ** 3 + 1        # K' = max(floor(5/8), 1): never 0


def test_karras_grid_ascends_from_sigma_min_to_sigma_max():
    ct = CT(CTConfig(distance="l2"), SHAPE, 0)
    grid = ct.grid(18, "cpu")
    assert grid[0].item() == pytest.approx(0.002) and grid[-1].item() == pytest.approx(80.0)
    assert (grid[1:] > grid[:-1]).all()
    rho = 7.0
    mid = (0.002 ** (1 / rho) + 0.5 * (80 ** (1 / rho) - 0.002 ** (1 / rho))) ** rho
    assert ct.grid(3, "cpu")[1].item() == pytest.approx(mid, rel=1e-6)


def test_ict_index_probabilities_are_erf_differences():
    grid = torch.tensor([0.002, 0.1, 1.0, 80.0], dtype=torch.float64)
    probs = ict_index_probs(grid, -1.1, 2.0)
    cdf = [math.erf((math.log(t) + 1.1) / (math.sqrt(2) * 2.0)) for t in grid.tolist()]
    raw = [cdf[i + 1] - cdf[i] for i in range(3)]
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert probs.tolist() == pytest.approx([r / sum(raw) for r in raw], rel=1e-12)


# -- losses against straight-line implementations ------------------------------------------------------
class TinyNet(nn.Module):
    """F(x_in, c_noise): a conv plus a noise-dependent offset, with dropout (to check the replayed mask)."""

    def __init__(self, dropout=0.0):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, c_noise, labels=None):
        return self.drop(self.conv(x)) + 0.1 * c_noise.reshape(-1, 1, 1, 1)


def _denoise_by_hand(net, x, t, sd=0.5, eps=0.002):
    t4 = t.reshape(-1, 1, 1, 1)
    c_skip = sd ** 2 / ((t4 - eps) ** 2 + sd ** 2)
    c_out = (t4 - eps) * sd / (t4 ** 2 + sd ** 2).sqrt()
    return c_skip * x + c_out * net(x / (t4 ** 2 + sd ** 2).sqrt(), t.log() / 4)


def _karras_by_hand(n):
    rho = 7.0
    return torch.tensor([(0.002 ** (1 / rho) + i / (n - 1) * (80 ** (1 / rho) - 0.002 ** (1 / rho))) ** rho
                         for i in range(n)], dtype=torch.float32)


def _ctx(net, step=0, total=100, teacher=None):
    return StepContext(net=net, net_nograd=net, teacher=teacher, step=step, total_steps=total,
                       generator=torch.Generator().manual_seed(123))


def _batch():
    return {"x": torch.rand(6, *SHAPE, generator=torch.Generator().manual_seed(5)) * 2 - 1, "y": None}


def test_ct_loss_matches_straight_line():
    net = TinyNet()
    ct = CT(CTConfig(distance="l2"), SHAPE, 0)
    ct.attach(net)
    with torch.no_grad():                              # make the EMA target differ from the online net
        ct.target.conv.weight.mul_(0.5)
    x0 = _batch()["x"]
    out = ct.loss(_ctx(net, step=30, total=100), {"x": x0, "y": None})

    n = math.ceil(math.sqrt(0.3 * (151 ** 2 - 4) + 4) - 1) + 1
    grid = _karras_by_hand(n)
    gen = torch.Generator().manual_seed(123)
    i = torch.randint(0, n - 1, (6,), generator=gen)
    z = torch.randn(x0.shape, generator=gen)
    t_cur, t_next = grid[i], grid[i + 1]
    pred = _denoise_by_hand(net, x0 + t_next.reshape(-1, 1, 1, 1) * z, t_next)
    target = _denoise_by_hand(ct.target, x0 + t_cur.reshape(-1, 1, 1, 1) * z, t_cur)
    expected = ((pred - target) ** 2).sum(dim=(1, 2, 3)).mean()
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out["ct/num_scales"] == n
    assert out["ct/target_mu"] == pytest.approx(math.exp(2 * math.log(0.9) / n))


def test_ict_loss_matches_straight_line_with_shared_dropout():
    net = TinyNet(dropout=0.5)
    ict = ICT(ICTConfig(), SHAPE, 0)
    x0 = _batch()["x"]
    torch.manual_seed(7)
    out = ict.loss(_ctx(net, step=30, total=100), {"x": x0, "y": None})

    n = min(10 * 2 ** (30 // math.floor(100 / 8)), 1280) + 1          # K' = floor(100 / 8) = 12
    grid = _karras_by_hand(n).double()
    cdf = torch.erf((grid.log() + 1.1) / (math.sqrt(2) * 2.0))
    gen = torch.Generator().manual_seed(123)
    i = torch.multinomial(((cdf[1:] - cdf[:-1]) / (cdf[-1] - cdf[0])).float(), 6, replacement=True, generator=gen)
    z = torch.randn(x0.shape, generator=gen)
    grid = grid.float()
    t_cur, t_next = grid[i], grid[i + 1]
    torch.manual_seed(7)
    pred = _denoise_by_hand(net, x0 + t_next.reshape(-1, 1, 1, 1) * z, t_next)
    torch.manual_seed(7)                                   # the same dropout mask for the target
    with torch.no_grad():
        target = _denoise_by_hand(net, x0 + t_cur.reshape(-1, 1, 1, 1) * z, t_cur)
    c = 0.00054 * math.sqrt(64)
    per = (((pred - target) ** 2).sum(dim=(1, 2, 3)) + c * c).sqrt() - c
    expected = (per / (t_next - t_cur)).mean()
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out["ict/target_mu"] == 0.0


class GaussianTeacher(nn.Module):
    """An EDM-parameterized network whose denoiser is exactly E[x0 | x_t] for x0 ~ N(0, s^2 I):
    D(x, t) = s^2 / (s^2 + t^2) x, so F = (D - c_skip x) / c_out with EDM's unshifted c's."""

    def __init__(self, s=0.3, sd=0.5):
        super().__init__()
        self.s, self.sd = s, sd

    def forward(self, x_in, c_noise, labels=None):
        t = (4 * c_noise.double()).exp().reshape(-1, 1, 1, 1)
        sd2 = self.sd ** 2
        x = x_in.double() * (t ** 2 + sd2).sqrt()
        d = self.s ** 2 / (self.s ** 2 + t ** 2) * x
        c_skip, c_out = sd2 / (t ** 2 + sd2), t * self.sd / (t ** 2 + sd2).sqrt()
        return ((d - c_skip * x) / c_out).float()


def _rel_err(a, b):
    return ((a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)).max().item()


def test_cd_step_follows_the_exact_pf_ode_of_a_gaussian():
    # For x0 ~ N(0, s^2 I) the PF-ODE solution is x(t) = x(t0) sqrt(s^2 + t^2) / sqrt(s^2 + t0^2).
    s = 0.3
    teacher = GaussianTeacher(s)
    ctx = _ctx(None, teacher=teacher)

    def exact(x, t_from, t_to):
        return x * ((s ** 2 + t_to ** 2) / (s ** 2 + t_from ** 2)).sqrt().reshape(-1, 1, 1, 1)

    for n, tol in ((18, 0.03), (640, 2e-5)):              # CIFAR-10's N = 18, and a fine grid
        cd = CD(CDConfig(distance="l2", solver="heun", num_scales=n), SHAPE, 0)
        grid = cd.grid(n, "cpu")
        x = torch.randn(n - 1, *SHAPE, generator=torch.Generator().manual_seed(0)) * grid[1:].reshape(-1, 1, 1, 1)
        stepped = cd.target_point(ctx, None, None, x, grid[1:], grid[:-1], None)
        assert _rel_err(stepped, exact(x, grid[1:], grid[:-1])) < tol
    # the local error falls as h^3 for Heun and h^2 for Euler: halving h divides it by ~8 and ~4 (float64)
    x = torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t_from = torch.tensor([1.0], dtype=torch.float64)
    for solver, ratio in (("heun", 8.0), ("euler", 4.0)):
        errs = [_rel_err(ode_step(lambda x, t: s ** 2 / (s ** 2 + t.reshape(-1, 1, 1, 1) ** 2) * x, x, t_from,
                                  t_from - h, solver), exact(x, t_from, t_from - h)) for h in (0.04, 0.02, 0.01)]
        assert errs[0] / errs[1] == pytest.approx(ratio, rel=0.1) and errs[1] / errs[2] == pytest.approx(ratio, rel=0.1)


def test_cd_loss_uses_the_teacher_step_and_online_target():
    net, teacher = TinyNet(), GaussianTeacher()
    cd = CD(CDConfig(distance="l1", solver="heun"), SHAPE, 0)
    cd.attach(net)
    assert cd.target is None                            # target_mu = 0: theta^- = theta [spec B.3]
    x0 = _batch()["x"]
    out = cd.loss(_ctx(net, teacher=teacher), {"x": x0, "y": None})
    grid = _karras_by_hand(18)
    gen = torch.Generator().manual_seed(123)
    i = torch.randint(0, 17, (6,), generator=gen)
    z = torch.randn(x0.shape, generator=gen)
    t_cur, t_next = grid[i], grid[i + 1]
    x_next = x0 + t_next.reshape(-1, 1, 1, 1) * z
    exact = x_next * ((0.09 + t_cur ** 2) / (0.09 + t_next ** 2)).sqrt().reshape(-1, 1, 1, 1)
    pred = _denoise_by_hand(net, x_next, t_next)
    target = _denoise_by_hand(net, exact, t_cur)
    expected = (pred - target).abs().sum(dim=(1, 2, 3)).mean()
    assert out["loss"].item() == pytest.approx(expected.item(), rel=2e-3)


def test_target_ema_moves_at_mu():
    net = TinyNet()
    ct = CT(CTConfig(distance="l2"), SHAPE, 0)
    ct.attach(net)
    before = ct.target.conv.weight.clone()
    with torch.no_grad():
        net.conv.weight.add_(1.0)
    ct.after_step(net, step=0, total_steps=100)
    mu = ct_target_mu(2, 2, 0.9)                      # N(0) = 2: mu = 0.9
    assert torch.allclose(ct.target.conv.weight, mu * before + (1 - mu) * net.conv.weight)
    state = copy.deepcopy(ct.state_dict())
    fresh = CT(CTConfig(distance="l2"), SHAPE, 0)
    fresh.attach(TinyNet())
    fresh.load_state_dict(state)
    assert torch.equal(fresh.target.conv.weight, ct.target.conv.weight)
    with pytest.raises(ValueError, match="keeps a target network but the checkpoint has none"):
        fresh.load_state_dict({})


# -- sampling ----------------------------------------------------------------------------------------
def test_multistep_sampling_renoises_with_sqrt_t2_minus_eps2():
    calls = []

    def f(x, t):
        calls.append((x.clone(), t.clone()))
        return torch.zeros_like(x)

    noise = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(1))
    consistency_sample(f, noise, [80.0, 0.821], torch.Generator().manual_seed(2), sigma_min=0.002)
    z = torch.randn(noise.shape, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(calls[0][0], noise * 80.0) and calls[0][1].tolist() == [80.0] * 4
    assert torch.allclose(calls[1][0], math.sqrt(0.821 ** 2 - 0.002 ** 2) * z)
    assert calls[1][1].tolist() == pytest.approx([0.821] * 4)


def _official_tau(steps, index):
    # the CM code's ts index on a descending Karras grid of `steps` points (spec B.7)
    rho = 7.0
    return (80 ** (1 / rho) + index / (steps - 1) * (0.002 ** (1 / rho) - 80 ** (1 / rho))) ** rho


@pytest.mark.parametrize("name,preset,mid", [("ct", "imagenet64", _official_tau(201, 106)),
                                             ("cd", "imagenet64", _official_tau(40, 22)),
                                             ("ict", "imagenet64", 1.526), ("ict", "cifar10", 0.821)])
def test_two_step_mid_points_per_preset(name, preset, mid):
    cls = methods.get(name)
    cfg = cls.Config(**{**cls.PRESETS[preset], "distance": "l2"})
    assert cfg.mid_t == [pytest.approx(mid, abs=5e-5)] and cls(cfg, SHAPE, 0).default_steps() == 2


# -- config ------------------------------------------------------------------------------------------
def test_config_errors_for_the_discrete_methods(tmp_path):
    with pytest.raises(ConfigError, match="method cd distills a teacher: set teacher=RUN_DIR"):
        compose(["method=cd"])
    with pytest.raises(ConfigError, match="distance=lpips needs the LPIPS weights: .*method.lpips_weights=FOLDER"):
        compose(["method=ct", "preset=cifar10"])
    with pytest.raises(ConfigError, match=f"LPIPS weight file {tmp_path}/{VGG_FILE} is missing"):
        compose(["method=ct", "method.distance=lpips", f"method.lpips_weights={tmp_path}"])
    with pytest.raises(ConfigError, match="unknown method.distance 'l3'; valid: l2, l1, pseudo_huber, lpips"):
        compose(["method=ict", "method.distance=l3"])
    cfg = compose(["method=ct", "data=digits"])
    assert cfg.method.distance == "l2" and cfg.method.s1 == 20      # the tiny preset: no LPIPS on a CPU box


# -- LPIPS -------------------------------------------------------------------------------------------
def _tiny_features():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, padding=1), nn.ReLU())


def test_lpips_formula_on_a_stand_in_network():
    feats = _tiny_features()
    lins = [torch.rand(4), torch.rand(5)]
    lp = LPIPS(feats, (1, 3), lins, resize=0)
    x, y = torch.rand(2, 3, 6, 6) * 2 - 1, torch.rand(2, 3, 6, 6) * 2 - 1

    shift = torch.tensor([-0.030, -0.088, -0.188]).reshape(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).reshape(1, 3, 1, 1)

    def taps(img):
        h1 = feats[1](feats[0]((img - shift) / scale))
        h2 = feats[3](feats[2](h1))
        return [h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10) for h in (h1, h2)]

    expected = sum(((a - b) ** 2 * w.reshape(1, -1, 1, 1)).sum(1).mean(dim=(1, 2))
                   for a, b, w in zip(taps(x), taps(y), lins))
    assert torch.allclose(lp(x, y), expected, atol=1e-6)
    assert torch.allclose(lp(x, x), torch.zeros(2), atol=1e-7)
    gray = torch.rand(2, 1, 6, 6)                       # one channel: the same image in RGB
    assert torch.allclose(lp(gray, -gray), lp(gray.expand(-1, 3, -1, -1), -gray.expand(-1, 3, -1, -1)))


def test_lpips_loads_the_official_file_layout(tmp_path):
    from torchvision.models import vgg16
    features = vgg16(weights=None).features
    # the taps are relu1_2 ... relu5_3: the ReLU just before each max-pool of VGG16
    assert [i - 1 for i, m in enumerate(features) if isinstance(m, nn.MaxPool2d)] == list(VGG_TAPS)
    assert all(isinstance(features[i], nn.ReLU) for i in VGG_TAPS)
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, tmp_path / VGG_FILE)
    lins = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(lins, tmp_path / LIN_FILE)
    lp = load_lpips(str(tmp_path), resize=32)
    assert torch.equal(lp.features[0].weight, features[0].weight)
    assert [int(w.numel()) for w in lp.lins] == [64, 128, 256, 512, 512] and lp.taps == VGG_TAPS
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    d = lp(x, x.flip(-1))
    assert d.shape == (2,) and (d > 0).all() and torch.allclose(lp(x, x), torch.zeros(2), atol=1e-6)
    (tmp_path / LIN_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=f"LPIPS weight file {tmp_path}/{LIN_FILE} is missing: fetch"):
        load_lpips(str(tmp_path))


def test_cd_teacher_on_other_data_is_refused_before_training(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from harness.train.rundir import RunDir
    from harness.train.trainer import check_source_run
    teacher_dir = tmp_path / "teacher"
    source = RunDir(teacher_dir)
    source.prepare(compose(["method=edm", "data=swissroll", "model=mlp-xs", f"run_dir={teacher_dir}"]))
    source.write_json("result.json", {"status": "completed"})
    digits = compose(["method=cd", f"teacher={teacher_dir}"]).data
    with pytest.raises(ValueError, match=f"{teacher_dir} was trained on swissroll, this run uses digits"):
        check_source_run(str(teacher_dir), digits)
    student = tmp_path / "student"
    proc = subprocess.run([sys.executable, "-m", "harness.train", "method=cd", f"teacher={teacher_dir}",
                           "--out", str(student)], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 2 and not student.exists()
    assert proc.stderr.strip().splitlines()[-1] == \
        f"error: teacher: {teacher_dir} was trained on swissroll, this run uses digits"


def test_ct_cifar10_recipe_follows_the_released_code_for_the_target_ema(cifar10_stub, tmp_path):
    """The CT CIFAR-10 recipe divides by N(k) - 1 in mu(k) as the released CM code does (the published FIDs
    come from it); the paper's formula (N(k)) stays the method's default."""
    from harness.config import compose
    for name in ("vgg16-397923af.pth", "vgg.pth"):
        (tmp_path / name).touch()
    cfg = compose(["recipe=ct-cifar10", f"data.path={cifar10_stub}", f"method.lpips_weights={tmp_path}"])
    assert cfg.method.mu_divisor == "n_minus_1"
    assert compose(["method=ct", "method.distance=l2"]).method.mu_divisor == "n"
