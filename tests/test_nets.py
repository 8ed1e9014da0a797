"""harness.nets: the shared forward contract, determinism, conditioning, dtypes, dropout, and the
paper sizes' parameter counts, parametrized over every small preset."""

import dataclasses
import re

import pytest
import torch
from omegaconf import OmegaConf

from harness.nets import attention as attn_mod
from harness.nets import ARCHS, MODEL_PRESETS, build_net, count_params, get_preset
from harness.nets.layers import ARCH_NAMES

SMALL = [f"{arch}-{size}" for arch in ("unet", "ddpmpp", "dit", "mlp") for size in ("xs", "s", "m")]
WITH_ATTENTION = ["unet-s", "unet-m", "ddpmpp-s", "ddpmpp-m", "dit-xs", "dit-s", "dit-m"]
BATCH = 3


def data_shape(cfg):
    return (2,) if cfg.arch == "mlp" else (1, 8, 8)


def make(name, num_classes=0, seed=0, **overrides):
    cfg = dataclasses.replace(get_preset(name), **overrides)
    torch.manual_seed(seed)
    return build_net(cfg, data_shape(cfg), num_classes)


def inputs(net, seed=1, num_classes=0, extra_dim=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, *net.data_shape, generator=gen)
    noise = torch.randn(BATCH, generator=gen)
    labels = torch.randint(0, num_classes, (BATCH,), generator=gen) if num_classes else None
    extra = torch.rand(BATCH, extra_dim, generator=gen) if extra_dim else None
    return x, noise, labels, extra


@torch.no_grad()
def perturb(net, seed=2, scale=0.1):
    # Moves every parameter off its init, so zero-initialized gains/gates/output layers stop hiding inputs.
    gen = torch.Generator().manual_seed(seed)
    for param in net.parameters():
        param.add_(torch.randn(param.shape, generator=gen) * scale)
    return net


def differs(a, b):
    return (a - b).abs().max().item() > 1e-5


@pytest.mark.parametrize("name", SMALL)
def test_output_shape_and_dtype(name):
    net = make(name).eval()
    x, noise, _, _ = inputs(net)
    for x_in in (x, x.double(), x.half()):
        out = net(x_in, noise)
        assert out.shape == (BATCH, *net.data_shape) and out.dtype == torch.float32
        assert torch.isfinite(out).all()
    assert torch.equal(net(x, noise.reshape(BATCH, 1, 1, 1)), net(x, noise))  # EDM-style [B,1,1,1] labels


@pytest.mark.parametrize("name", SMALL)
def test_int_and_onehot_labels_agree(name):
    net = perturb(make(name, num_classes=10)).eval()
    x, noise, labels, _ = inputs(net, num_classes=10)
    onehot = torch.nn.functional.one_hot(labels, 10).float()
    torch.testing.assert_close(net(x, noise, labels), net(x, noise, onehot), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", SMALL)
def test_output_depends_on_every_input(name):
    net = perturb(make(name, num_classes=10, extra_cond_dim=2)).eval()
    x, noise, labels, extra = inputs(net, num_classes=10, extra_dim=2)
    base = net(x, noise, labels, extra)
    assert differs(net(x + 0.5, noise, labels, extra), base)
    assert differs(net(x, noise + 0.5, labels, extra), base)
    assert differs(net(x, noise, (labels + 1) % 10, extra), base)
    assert differs(net(x, noise, torch.zeros(BATCH, 10), extra), base)  # "no class" row
    assert differs(net(x, noise, labels, extra + 0.5), base)
    # Per-sample: changing sample 0's noise label changes only sample 0.
    moved = noise.clone()
    moved[0] += 1.0
    out = net(x, moved, labels, extra)
    assert differs(out[0], base[0]) and torch.allclose(out[1:], base[1:], atol=1e-6)


@pytest.mark.parametrize("name", SMALL)
def test_logvar_head(name):
    net = perturb(make(name, logvar=True)).eval()
    x, noise, _, _ = inputs(net)
    out, logvar = net(x, noise, return_logvar=True)
    assert out.shape == (BATCH, *net.data_shape) and logvar.shape == (BATCH,)
    assert logvar.dtype == torch.float32 and torch.isfinite(logvar).all()
    assert torch.equal(out, net(x, noise))
    assert differs(net(x, noise + 1.0, return_logvar=True)[1], logvar)
    with pytest.raises(ValueError, match="logvar=False"):
        make(name)(x, noise, return_logvar=True)


@pytest.mark.parametrize("name", SMALL)
def test_bad_inputs_raise_value_error(name):
    uncond = make(name)
    cond = make(name, num_classes=10, extra_cond_dim=2)
    x, noise, labels, extra = inputs(cond, num_classes=10, extra_dim=2)
    cases = [
        (lambda: uncond(x, noise, labels), "unconditional"),
        (lambda: cond(x, noise, None, extra), "class-conditional"),
        (lambda: cond(x, noise, torch.zeros(BATCH, 9), extra), r"\[3, 10\]"),
        (lambda: cond(x, noise, labels[:2], extra), "class_labels"),
        (lambda: cond(x, noise, labels, None), "extra"),
        (lambda: cond(x, noise, labels, extra[:, :1]), r"\[3, 2\]"),
        (lambda: uncond(x, noise, None, extra), "extra_cond_dim=0"),
        (lambda: uncond(x, noise[:2]), "noise_labels"),
        (lambda: uncond(x, torch.arange(BATCH)), "float"),
        (lambda: uncond(x[:, None], noise), "x must have shape"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_build_rejects_bad_configs(arch):
    cfg = next(c for c in MODEL_PRESETS.values() if c.arch == arch)
    wrong_shape = (1, 8, 8) if arch == "mlp" else (2,)
    with pytest.raises(ValueError, match="image shape" if arch != "mlp" else "vector shape"):
        build_net(cfg, wrong_shape, 0)
    with pytest.raises(ValueError, match="unknown attention backend 'nope'; valid: math, sdpa"):
        build_net(dataclasses.replace(cfg, attention="nope"), data_shape(cfg), 0)
    with pytest.raises(ValueError, match="unknown field"):
        build_net({**dataclasses.asdict(cfg), "bogus": 1}, data_shape(cfg), 0)
    with pytest.raises(ValueError, match="unknown arch"):
        build_net({**dataclasses.asdict(cfg), "arch": "resnet"}, data_shape(cfg), 0)


@pytest.mark.parametrize("name", SMALL)
def test_construction_is_deterministic(name):
    a, b, c = make(name, seed=0).state_dict(), make(name, seed=0).state_dict(), make(name, seed=1).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert any(not torch.equal(a[key], c[key]) for key in a)


@pytest.mark.parametrize("name", SMALL)
def test_dropout_eval_deterministic_and_train_replayable(name):
    net = perturb(make(name, dropout=0.3))
    x, noise, _, _ = inputs(net)
    net.eval()
    assert torch.equal(net(x, noise), net(x, noise))
    net.train()
    state = torch.get_rng_state()
    first = net(x, noise)
    torch.set_rng_state(state)
    replay = net(x, noise)
    other = net(x, noise)  # the RNG has moved on: a new dropout mask
    assert torch.equal(first, replay)
    assert differs(first, other)
    assert differs(first, net.eval()(x, noise))


@pytest.mark.parametrize("name", SMALL)
def test_jvp_pass_replays_dropout_and_matches_backward(name):
    # The sCM pattern: a no-grad torch.func.jvp pass, then (same RNG state) the gradient pass.
    net = perturb(make(name, num_classes=10, extra_cond_dim=1, dropout=0.3, attention="math")).train()
    x, noise, labels, extra = inputs(net, num_classes=10, extra_dim=1)
    gen = torch.Generator().manual_seed(5)
    x_dot, noise_dot = torch.randn(x.shape, generator=gen), torch.ones(BATCH)  # tangents before saving the state
    state = torch.get_rng_state()
    with torch.no_grad():
        out_jvp, out_dot = torch.func.jvp(lambda a, b: net(a, b, labels, extra), (x, noise), (x_dot, noise_dot))
    torch.set_rng_state(state)
    x_grad, noise_grad = x.clone().requires_grad_(), noise.clone().requires_grad_()
    out = net(x_grad, noise_grad, labels, extra)
    assert torch.equal(out_jvp, out)  # same dropout mask, same (force-normalized) weights
    # Dot-product test: <v, J u> from forward mode equals <J^T v, u> from reverse mode.
    v = torch.randn(out.shape, generator=gen)
    grad_x, grad_noise = torch.autograd.grad((out * v).sum(), (x_grad, noise_grad))
    forward = (out_dot * v).sum().item()
    reverse = ((grad_x * x_dot).sum() + (grad_noise * noise_dot).sum()).item()
    # fp32 sums that cancel: the tolerance is relative to the sum of the terms' magnitudes, not to the sum
    magnitude = (out_dot * v).abs().sum().item()
    assert abs(forward - reverse) <= 1e-5 * magnitude
    assert (grad_noise * noise_dot).abs().sum() > 0  # the time tangent reaches the output


def _grads(net, out):
    return torch.autograd.grad(out.square().sum(), list(net.parameters()), allow_unused=True)


@pytest.mark.parametrize("name", ["unet-xs", "ddpmpp-xs", "dit-xs", "mlp-xs"])
def test_a_dropout_tape_hands_back_what_replaying_the_rng_draws(name):
    """DropoutTape: the second pass gets the first pass's masks without drawing them again; outputs,
    gradients and the RNG afterwards equal those of replaying the RNG state, bit for bit, after a
    grad pass and after a torch.func.jvp pass (the sCM order)."""
    from harness.nets.layers import DropoutTape
    net = perturb(make(name, dropout=0.3, attention="math")).train()
    x, noise, _, _ = inputs(net)
    x_dot, noise_dot = torch.randn_like(x), torch.ones(BATCH)
    for first_pass in ("grad", "jvp"):
        start = torch.get_rng_state()
        outs, grads, rng_after = [], [], []
        for mode in ("rng", "tape"):
            torch.set_rng_state(start)
            tape = DropoutTape()
            with tape.record():
                if first_pass == "grad":
                    first = net(x, noise)
                else:
                    with torch.no_grad():
                        first, _ = torch.func.jvp(lambda a, b: net(a, b), (x, noise), (x_dot, noise_dot))
            after_first = torch.get_rng_state()
            if mode == "rng":
                torch.set_rng_state(start)
                second = net(x * 0.5, noise)
            else:
                with tape.replay():
                    second = net(x * 0.5, noise)
            outs.append((first, second))
            grads.append(_grads(net, second))
            rng_after.append((after_first, torch.get_rng_state()))
        (first_rng, second_rng), (first_tape, second_tape) = outs
        assert torch.equal(first_rng, first_tape) and torch.equal(second_rng, second_tape), first_pass
        assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(*grads))
        assert torch.equal(rng_after[1][0], rng_after[1][1])     # the replay drew nothing ...
        assert torch.equal(rng_after[0][1], rng_after[1][1])     # ... and the RNG is where the replay leaves it
    assert differs(net(x, noise), net(x, noise))                 # no tape: a fresh mask per pass


def _matmul_and_conv_calls(fn) -> int:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    kernels = ("aten::mkldnn_convolution", "aten::mm", "aten::addmm", "aten::bmm")
    # one kernel call counts once, not again for each dispatch layer it passes (functorch re-enters addmm)
    return sum(1 for e in prof.events() if e.name in kernels and (e.cpu_parent is None or e.cpu_parent.name != e.name))


@pytest.mark.parametrize("name", ["unet-s", "ddpmpp-s", "dit-xs", "mlp-xs"])
def test_the_jvp_pass_skips_the_zero_weight_tangents_and_gives_the_same_bits(name, monkeypatch):
    """In a no-grad torch.func.jvp pass the parameters are constants: each convolution / linear layer runs
    twice (primal, x's tangent), not three times as functorch's own rule does (it also applies the op to
    the weight's zero tangent); outputs and tangents equal functorch's bit for bit, dropout on."""
    import harness.nets.layers as layers
    net = perturb(make(name, dropout=0.3, attention="math")).train()
    x, noise, _, _ = inputs(net)
    x_dot, noise_dot = torch.randn_like(x), torch.ones(BATCH)
    results, calls = {}, {}
    for mode in ("ours", "functorch"):
        if mode == "functorch":
            monkeypatch.setattr(layers, "_transformed", None)      # weight_op falls back to the plain op
        def jvp():
            torch.manual_seed(0)
            with torch.no_grad():
                results[mode] = torch.func.jvp(lambda a, b: net(a, b), (x, noise), (x_dot, noise_dot))
        calls[mode] = _matmul_and_conv_calls(jvp)
    with torch.no_grad():
        plain = _matmul_and_conv_calls(lambda: net(x, noise))
    assert all(torch.equal(a, b) for a, b in zip(results["ours"], results["functorch"]))
    assert calls["ours"] < calls["functorch"]
    assert calls["ours"] <= 2 * plain, (calls, plain)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cpu_dropout_keeps_where_a_float32_uniform_is_below_one_minus_p(dtype):
    """The CPU mask, against a straight line from the same RNG state: kept where torch.rand < 1 - p, scaled
    by 1 / (1 - p); one float32 uniform per element (the RNG ends where that draw leaves it); the kept
    fraction within 4 binomial sigmas of 1 - p."""
    from harness.nets.layers import Dropout
    p, shape = 0.3, (64, 8, 16, 16)
    x = torch.randn(shape, dtype=dtype)
    layer = Dropout(p).train()
    start = torch.get_rng_state()
    out = layer(x)
    after = torch.get_rng_state()
    torch.set_rng_state(start)
    keep = torch.rand(shape) < 1 - p
    assert torch.equal(after, torch.get_rng_state())
    assert torch.equal(out, torch.where(keep, x * torch.tensor(1 / (1 - p), dtype=dtype), torch.zeros((), dtype=dtype)))
    n = keep.numel()
    assert abs(keep.sum().item() - n * (1 - p)) < 4 * (n * p * (1 - p)) ** 0.5


def test_a_dropout_tape_refuses_a_pass_it_did_not_record():
    from harness.nets.layers import DropoutTape
    net = perturb(make("unet-xs", dropout=0.3)).train()
    x, noise, _, _ = inputs(net)
    tape = DropoutTape()
    with tape.record():
        net(x, noise)
    with pytest.raises(RuntimeError, match=r"dropout layer 0 of the replayed pass sees \(6, \d+, 8, 8\), the recorded pass \(3, \d+, 8, 8\)"):
        with tape.replay():
            net(torch.cat([x, x]), torch.cat([noise, noise]))
    with tape.record():
        pass
    with pytest.raises(RuntimeError, match="the replayed pass has more dropout layers than the recorded one \\(0\\)"):
        with tape.replay():
            net(x, noise)
    unshared = DropoutTape(share=False)       # method.shared_dropout_mask=false: each pass draws its own
    with unshared.record():
        first = net(x, noise)
    with unshared.replay():
        assert differs(first, net(x, noise))


@pytest.mark.parametrize("name", SMALL)
def test_bf16_module_takes_fp32_and_returns_fp32(name):
    net = perturb(make(name, num_classes=10, extra_cond_dim=1, logvar=True)).eval()
    x, noise, labels, extra = inputs(net, num_classes=10, extra_dim=1)
    ref, ref_logvar = net(x, noise, labels, extra, return_logvar=True)
    net = net.to(torch.bfloat16)
    assert all(b.dtype == torch.float32 for n, b in net.named_buffers() if n.endswith(("freqs", "phases")))
    out, logvar = net(x, noise, labels, extra, return_logvar=True)
    assert out.dtype == torch.float32 and logvar.dtype == torch.float32
    assert out.shape == ref.shape and torch.isfinite(out).all()
    scale = ref.abs().max().item()
    assert (out - ref).abs().max().item() < 0.1 * scale + 1e-3
    assert (logvar - ref_logvar).abs().max().item() < 0.05


@pytest.mark.parametrize("name", SMALL)
def test_gradients_reach_every_parameter_after_a_few_steps(name):
    # Zero-initialized gains/gates/output layers block gradients to the rest at step 0 (by design);
    # after a few Adam steps every parameter must receive a nonzero, finite gradient.
    net = make(name, num_classes=10, extra_cond_dim=1, logvar=True).train()
    x, noise, labels, extra = inputs(net, num_classes=10, extra_dim=1)
    target = torch.randn_like(x)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for step in range(5):
        opt.zero_grad(set_to_none=True)
        out, logvar = net(x, noise, labels, extra, return_logvar=True)
        per_sample = (out - target).square().flatten(1).mean(1)
        loss = (per_sample / logvar.exp() + logvar).mean()  # EDM2-style uncertainty weighting
        loss.backward()
        if step == 0:
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
        if step < 4:
            opt.step()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not (p.grad.abs().sum() > 0)]
    assert not missing, f"no gradient reached: {missing}"
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


@pytest.mark.parametrize("name", WITH_ATTENTION)
def test_attention_goes_through_harness_attention(name, monkeypatch):
    calls = []

    def counting(q, k, v):
        calls.append(tuple(q.shape))
        return attn_mod.BACKENDS["math"](q, k, v)

    monkeypatch.setitem(attn_mod.BACKENDS, "counting", counting)
    net_sdpa = perturb(make(name)).eval()
    x, noise, _, _ = inputs(net_sdpa)
    net_math = perturb(make(name, attention="math")).eval()
    net_count = perturb(make(name, attention="counting")).eval()
    ref = net_sdpa(x, noise)
    torch.testing.assert_close(net_math(x, noise), ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(net_count(x, noise), ref, atol=1e-5, rtol=1e-4)
    assert calls and all(len(shape) == 4 and shape[0] == BATCH for shape in calls)


def block_dropouts(net):
    """{resolution: set of dropout probabilities} over the blocks of a U-Net."""
    found = {}
    for name, module in net.named_modules():
        match = re.search(r"(\d+)x\d+_(?:block\d+|down|up|in\d)$", name)
        if match:
            found.setdefault(int(match.group(1)), set()).add(module.dropout.p)
    return found


def test_dropout_res_limits_dropout_to_low_resolutions():
    cfg = dataclasses.replace(get_preset("edm2-img64-s"), dropout=0.4, dropout_res=16)  # ECT ImageNet setting
    with torch.device("meta"):
        net = build_net(cfg, (3, 64, 64), 1000)
    assert block_dropouts(net) == {64: {0.0}, 32: {0.0}, 16: {0.4}, 8: {0.4}}
    for name in ("unet-s", "ddpmpp-s"):
        assert block_dropouts(make(name, dropout=0.5, dropout_res=4)) == {8: {0.0}, 4: {0.5}}
        assert block_dropouts(make(name, dropout=0.5, dropout_res=0)) == {8: {0.5}, 4: {0.5}}
    # Functional check: with dropout only at 4x4, the net still depends on the RNG in train mode.
    net = perturb(make("unet-s", dropout=0.5, dropout_res=4)).train()
    x, noise, _, _ = inputs(net)
    assert differs(net(x, noise), net(x, noise))


# (preset, data_shape, num_classes, reported Mparams, source)
PAPER_SIZES = [
    ("edm2-img64-s", (3, 64, 64), 1000, 280.2),  # ECT Table 7 (ECM-S = EDM2-S)
    ("edm2-img64-m", (3, 64, 64), 1000, 497.8),
    ("edm2-img64-l", (3, 64, 64), 1000, 777.5),
    ("edm2-img64-xl", (3, 64, 64), 1000, 1119.3),
    ("ddpmpp-cifar10", (3, 32, 32), 0, 55.7),  # ECT Table 7; EDM: 55.73M
    ("dit-s2", (4, 32, 32), 1000, 33.0),  # DiT Table 1 (256x256 latents, 1000 classes)
    ("dit-b2", (4, 32, 32), 1000, 130.0),
    ("dit-l2", (4, 32, 32), 1000, 458.0),
    ("dit-xl2", (4, 32, 32), 1000, 675.0),
]


@pytest.mark.parametrize("name, shape, num_classes, mparams", PAPER_SIZES)
def test_paper_sizes_param_counts(name, shape, num_classes, mparams):
    with torch.device("meta"):
        net = build_net(get_preset(name), shape, num_classes)
    assert all(p.is_meta for p in net.parameters())
    assert count_params(net) / 1e6 == pytest.approx(mparams, rel=0.01)


@pytest.mark.parametrize("name", list(MODEL_PRESETS))
def test_no_zero_dim_parameters(name):
    # DeepSpeed broadcasts each parameter as p.data.view(torch.uint8), which a 0-dim tensor cannot do.
    cfg = dataclasses.replace(get_preset(name), logvar=True, extra_cond_dim=1)
    with torch.device("meta"):
        net = build_net(cfg, (2,) if cfg.arch == "mlp" else (3, 32, 32), 10)
    assert all(p.ndim >= 1 for p in net.parameters())


def test_presets_are_structured_configs():
    for name, cfg in MODEL_PRESETS.items():
        assert cfg.name == name and cfg.arch in ARCHS and isinstance(cfg, ARCHS[cfg.arch][0])
        node = OmegaConf.structured(cfg)  # what Hydra's ConfigStore does with each preset
        assert OmegaConf.to_container(node) == dataclasses.asdict(cfg)
    cfg = get_preset("unet-s")
    cfg.channels = 8
    assert MODEL_PRESETS["unet-s"].channels == 32  # get_preset hands out copies


@pytest.mark.parametrize("name", ["unet-xs", "ddpmpp-xs", "dit-xs", "mlp-xs"])
def test_build_from_omegaconf_node_matches_dataclass(name):
    cfg = get_preset(name)
    node = OmegaConf.merge(OmegaConf.structured(cfg), {"dropout": 0.25})
    torch.manual_seed(0)
    from_node = build_net(node, data_shape(cfg), 0)
    torch.manual_seed(0)
    from_dataclass = build_net(dataclasses.replace(cfg, dropout=0.25), data_shape(cfg), 0)
    assert from_node.cfg == from_dataclass.cfg
    sd_a, sd_b = from_node.state_dict(), from_dataclass.state_dict()
    assert all(torch.equal(sd_a[key], sd_b[key]) for key in sd_a)
    assert count_params(from_node) == sum(v.numel() for k, v in sd_a.items() if "freqs" not in k and "phases" not in k)
