"""The method contract (methods/base.py), checked the same way for every registered method, teachers
included: the parameter list is methods.names(), so a new method is covered by being registered.

Each method runs as the trainer runs it on the digits (1x8x8, unconditional): its `tiny` preset (the one
`preset=auto` resolves to there; it also keeps CT and CD on the l2 distance, LPIPS needs weight files), a
unet-xs in the first variant its check_model accepts, a frozen teacher for distillation methods, attach /
attach_data, then loss with a StepContext seeded by the trainer's seed_step."""
import copy
import dataclasses
import io
import math
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

import methods
from harness.data import DATASETS
from harness.nets import build_net, get_preset
from harness.train.seeding import seed_step
from methods.base import StepContext

NAMES = methods.names()
per_method = pytest.mark.parametrize("name", NAMES, ids=NAMES)

SHAPE, NUM_CLASSES, BATCH = (1, 8, 8), 0, 8
STEP, TOTAL_STEPS = 5, 10        # mid-run: warmups, curricula and stages are past their first value
# Network variants tried in order; the first that the method's check_model accepts serves it (as a user
# would set model.logvar=true for sCT / sCD, model.extra_cond_dim=1 for GCM's vu variant).
NET_VARIANTS = ({}, {"logvar": True}, {"extra_cond_dim": 1}, {"logvar": True, "extra_cond_dim": 1})
# dropout > 0 so that the replayed dropout masks (shared_dropout_mask) are part of every check
NET_OVERRIDES = {"dropout": 0.1}


# -- building a method as the trainer does -------------------------------------------------------
def _config(name: str):
    """The method's config with its tiny preset applied over the defaults (what the digits resolve to)."""
    cls = methods.get(name)
    return dataclasses.replace(cls.Config(), preset="tiny", **cls.PRESETS["tiny"])


def _net_config(name: str):
    cls, cfg = methods.get(name), _config(name)
    for variant in NET_VARIANTS:
        net_cfg = dataclasses.replace(get_preset("unet-xs"), **NET_OVERRIDES, **variant)
        try:
            cls.check_model(cfg, OmegaConf.structured(net_cfg))
        except ValueError:
            continue
        return net_cfg
    pytest.fail(f"{name}: check_model refuses every network variant tried ({NET_VARIANTS})")


def _teacher(name: str) -> nn.Module | None:
    """A frozen network of the teacher method's kind (random weights: the contract, not the quality)."""
    cls = methods.get(name)
    if not cls.needs_teacher:
        return None
    torch.manual_seed(1)
    kind = cls.teacher_methods[0] if cls.teacher_methods else "edm"
    return build_net(_net_config(kind), SHAPE, NUM_CLASSES).eval().requires_grad_(False)


def _data() -> torch.Tensor:
    """A digits-like training set in [-1, 1]."""
    return torch.rand(64, *SHAPE, generator=torch.Generator().manual_seed(0)) * 2 - 1


def _build(name: str):
    """(method, net, teacher, training set), attached as the trainer attaches them."""
    torch.manual_seed(0)
    net = build_net(_net_config(name), SHAPE, NUM_CLASSES)
    method = methods.get(name)(_config(name), SHAPE, NUM_CLASSES)
    x = _data()
    method.attach(net)
    method.attach_data(x, None)
    return method, net, _teacher(name), x


def _loss(method, net, teacher, x, step=STEP, seed=0):
    """One loss call with the trainer's per-step seeding (global RNG for dropout, the method's generator)."""
    gen = seed_step(seed, step, 0, torch.device("cpu"))
    ctx = StepContext(net=net, net_nograd=net, teacher=teacher, step=step, total_steps=TOTAL_STEPS, generator=gen)
    return method.loss(ctx, {"x": x[:BATCH], "y": None})


class CountingNet(nn.Module):
    """Forwards to the network and counts the calls (the NFE a sampler really spends)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.net(*args, **kwargs)


# -- the registry ----------------------------------------------------------------------------------
def test_every_shipped_method_is_in_the_parameter_list():
    """Every method defined in the methods package, and every @register in its files, is checked here."""
    shipped = {n for n in methods.names() if methods.get(n).__module__.startswith("methods.")}
    assert shipped == set(NAMES)
    in_files = set()
    for path in Path(methods.__file__).parent.glob("*.py"):
        in_files |= set(re.findall(r'@register\("([^"]+)"\)', path.read_text()))
    assert in_files == set(NAMES), "a method file is missing from methods._BUILTIN_MODULES"


# -- the checks ------------------------------------------------------------------------------------
@per_method
def test_config_schema_and_presets(name):
    """Config is a dataclass named like the registry entry, with a preset field; PRESETS has the tiny
    fallback of preset_for, only names real fields, and the tiny preset and digits data pass the checks;
    teachers named by teacher_methods are registered methods."""
    cls = methods.get(name)
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    assert {"name", "preset"} <= fields and cls.Config().name == name
    assert "tiny" in cls.PRESETS and cls.preset_for("digits") in cls.PRESETS
    for preset, overrides in cls.PRESETS.items():
        assert set(overrides) <= fields - {"name", "preset"}, f"preset {preset} sets unknown fields"
    cls.check_config(_config(name))
    cls.check_data(_config(name), OmegaConf.structured(DATASETS["digits"]))
    assert set(cls.teacher_methods) <= set(NAMES)
    assert cls.needs_teacher or not cls.teacher_methods


def _bad_value(value):
    """A generic out-of-range value for a field of this type (None: not tried)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return type(value)(-1)
    if isinstance(value, str):
        return "no-such-choice"
    if isinstance(value, list) and value and all(isinstance(v, float) for v in value):
        return [-1.0]
    return None


@per_method
def test_bad_config_values_fail_before_work_in_one_line(name):
    """Negative numbers / unknown strings, one field at a time: check_config accepts them or raises a
    one-line ValueError naming the field, the constructor refuses the same config, and at least one
    field is validated."""
    cls, good = methods.get(name), _config(name)
    rejected = []
    for f in dataclasses.fields(good):
        bad = _bad_value(getattr(good, f.name))
        if f.name in ("name", "preset") or bad is None:
            continue
        cfg = dataclasses.replace(good, **{f.name: bad})
        try:
            cls.check_config(cfg)
        except ValueError as exc:
            msg = str(exc)
            assert msg and "\n" not in msg, f"{f.name}={bad!r}: the message is not one line: {msg!r}"
            assert re.search(rf"\b{f.name}\b", msg), f"{f.name}={bad!r}: the message does not name it: {msg}"
            with pytest.raises(ValueError):
                cls(cfg, SHAPE, NUM_CLASSES)
            rejected.append(f.name)
    assert rejected, f"{name}: check_config accepted every out-of-range value"


@per_method
def test_loss_is_finite_with_gradients_in_the_network(name):
    """loss() returns a finite scalar with a graph to the network, leaves backward to the trainer, logs
    only finite scalars; after backward every gradient is finite and some are nonzero. A distillation
    method without its teacher refuses in one line."""
    method, net, teacher, x = _build(name)
    out = _loss(method, net, teacher, x)
    loss = out["loss"]
    assert loss.ndim == 0 and loss.requires_grad and torch.isfinite(loss)
    assert all(p.grad is None for p in net.parameters()), "loss() must not call backward"
    for key, value in out.items():
        assert math.isfinite(float(value.detach() if torch.is_tensor(value) else value)), key
    loss.backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    if teacher is not None:
        assert all(p.grad is None for p in teacher.parameters())
        with pytest.raises(ValueError, match="teacher") as info:
            _loss(method, net, None, x)
        assert "\n" not in str(info.value)


@per_method
def test_samples_have_the_noise_shape_and_nfe_counts_network_calls(name):
    """sample() at 1, 2 and default_steps() steps maps noise to finite data of its shape, spends exactly
    nfe(steps) network calls, and repeats bit for bit with the same generator seed."""
    method, net, _, _ = _build(name)
    net.eval()
    noise = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(2))
    assert method.default_steps() >= 1
    for steps in sorted({1, 2, method.default_steps()}):
        counted = CountingNet(net)
        out = method.sample(counted, noise, steps, None, torch.Generator().manual_seed(3))
        assert out.shape == noise.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
        assert counted.calls == method.nfe(steps), f"steps={steps}"
        again = method.sample(net, noise, steps, None, torch.Generator().manual_seed(3))
        assert torch.equal(out, again), f"steps={steps}"


@per_method
def test_time_of_sigma_is_finite_and_increasing(name):
    """The sampler time of an EDM noise level (the 2-step mid-point search's unit) grows with sigma."""
    method = methods.get(name)(_config(name), SHAPE, NUM_CLASSES)
    times = [method.time_of_sigma(s) for s in (0.025, 0.1, 0.4, 1.6, 3.2)]
    assert all(math.isfinite(t) for t in times) and times == sorted(set(times))


@per_method
def test_state_round_trip_gives_the_same_next_loss(name):
    """After a step and after_step, state_dict() saved and loaded into a fresh instance (attached to the
    starting weights, as on resume) gives a bit-identical next loss; a stateless method takes {}."""
    method, net, teacher, x = _build(name)
    start = copy.deepcopy(net)
    _loss(method, net, teacher, x)["loss"].backward()
    with torch.no_grad():                                      # a stand-in optimizer step
        gen = torch.Generator().manual_seed(5)
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    method.after_step(net, STEP, TOTAL_STEPS)
    buf = io.BytesIO()
    torch.save(method.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    fresh = methods.get(name)(_config(name), SHAPE, NUM_CLASSES)
    fresh.attach(start)
    fresh.attach_data(x, None)
    fresh.load_state_dict(state)                               # {} for a method without state
    expected = _loss(method, net, teacher, x, step=STEP + 1)["loss"]
    assert torch.equal(_loss(fresh, net, teacher, x, step=STEP + 1)["loss"], expected)


@per_method
def test_same_seeds_give_bit_identical_losses_and_gradients(name):
    """Two builds from the same seeds give the same loss and gradients bit for bit; another step seed
    gives another loss (the step's noise comes from the context, not from a fixed stream)."""
    runs = []
    for _ in range(2):
        method, net, teacher, x = _build(name)
        loss = _loss(method, net, teacher, x)["loss"]
        loss.backward()
        runs.append((loss.detach(), [p.grad.clone() for p in net.parameters() if p.grad is not None]))
        other = _loss(method, net, teacher, x, seed=1)["loss"].detach()
    (loss_a, grads_a), (loss_b, grads_b) = runs
    assert torch.equal(loss_a, loss_b)
    assert len(grads_a) == len(grads_b) and all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
    assert not torch.equal(other, loss_b)
