"""Evaluation: Frechet distance, 2-D distances, the digits classifier, the FID path (stand-in extractor
through clean-fid's hook and Frechet code), its cache and errors, and `python -m harness.evaluate`."""
import json
import math
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from harness.config import ConfigError, EvalConfig, compose
from harness.data import DataConfig, Dataset
from harness.eval import digits_fd, fid, toy
from harness.eval.frechet import frechet_distance, frechet_from_stats
from harness.eval.metrics import MetricError, build_metric


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    """Any attempt to reach the network (clean-fid downloads with urllib) fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"download attempted: {args[:1]}")
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    import cleanfid.downloads_helper as dh
    monkeypatch.setattr(dh, "check_download_inception", refuse)
    monkeypatch.setattr(dh, "check_download_url", refuse)


def ecfg(**kw):
    return OmegaConf.structured(EvalConfig(**kw))


# -- Frechet distance -----------------------------------------------------------------------------------
def _sqrtm_psd(a):
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def closed_form(mu1, s1, mu2, s2):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), by eigendecompositions (no scipy)."""
    r = _sqrtm_psd(s1)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(_sqrtm_psd(r @ s2 @ r)))


def test_frechet_of_a_set_with_itself_is_zero():
    x = np.random.default_rng(0).normal(size=(500, 8)) * [1, 2, 3, 4, 1, 1, 0.5, 0.1]
    assert abs(frechet_distance(x, x)) < 1e-8


def test_frechet_of_two_gaussians_is_the_closed_form():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(4, 4)), rng.normal(size=(4, 4))
    s1, s2 = a @ a.T + 0.1 * np.eye(4), b @ b.T + 0.1 * np.eye(4)
    mu1, mu2 = rng.normal(size=4), rng.normal(size=4)
    expected = closed_form(mu1, s1, mu2, s2)
    assert frechet_from_stats(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    # diagonal by hand: sum_i (mu1_i - mu2_i)^2 + (sigma1_i - sigma2_i)^2 = (4 + 1) + (1 + 1)
    assert frechet_from_stats([1.0, 0.0], np.diag([4.0, 1.0]), [3.0, 1.0], np.diag([9.0, 4.0])) == pytest.approx(7.0)
    # and from samples of the two Gaussians (sampling error only)
    n = 200_000
    x = rng.multivariate_normal(mu1, s1, size=n)
    y = rng.multivariate_normal(mu2, s2, size=n)
    assert frechet_distance(x, y) == pytest.approx(expected, rel=0.02)


# -- 2-D distances --------------------------------------------------------------------------------------
def test_energy_distance_against_pair_loops():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(13, 2)), rng.normal(size=(9, 2)) + 0.5

    def mean_dist(p, q):
        return sum(math.dist(u, v) for u in p for v in q) / (len(p) * len(q))

    expected = 2 * mean_dist(a, b) - mean_dist(a, a) - mean_dist(b, b)
    ta, tb = torch.tensor(a), torch.tensor(b)
    assert toy.energy_distance(ta, tb) == pytest.approx(expected, rel=1e-12)
    assert toy.energy_distance(ta, ta) == pytest.approx(0.0, abs=1e-12)


def _w2_squared_by_replication(u, v):
    """Exact W_2^2 of two uniform empirical measures: replicate both to lcm(n, m) atoms, sort, pair up."""
    k = math.lcm(len(u), len(v))
    uu, vv = np.sort(np.repeat(u, k // len(u))), np.sort(np.repeat(v, k // len(v)))
    return float(((uu - vv) ** 2).mean())


def test_sliced_wasserstein_against_replicated_1d_transport():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(6, 2)), rng.normal(size=(4, 2)) * 2
    num = 7
    total = 0.0
    for k in range(num):
        w = np.array([math.cos(math.pi * k / num), math.sin(math.pi * k / num)])
        total += _w2_squared_by_replication(a @ w, b @ w)
    expected = math.sqrt(total / num)
    assert toy.sliced_wasserstein(torch.tensor(a), torch.tensor(b), num) == pytest.approx(expected, rel=1e-12)
    assert toy.sliced_wasserstein(torch.tensor(a), torch.tensor(a), num) == pytest.approx(0.0, abs=1e-12)


def test_wasserstein_1d_p1_matches_scipy():
    from scipy.stats import wasserstein_distance
    rng = np.random.default_rng(4)
    u, v = rng.normal(size=37), rng.normal(size=23) + 1
    assert toy.wasserstein_1d(u, v, p=1) == pytest.approx(wasserstein_distance(u, v), rel=1e-12)


def test_point_metrics_on_a_toy_record_their_protocol():
    from harness.data import load_dataset
    data = load_dataset(DataConfig(name="gaussians8", num_points=2000, heldout=500))
    for name in ("energy", "sliced_wasserstein"):
        metric = build_metric(ecfg(num_samples=300, sw_projections=64), data, metric=name)
        far = metric(torch.randn(300, 2) * 0.05)                    # everything collapsed at the origin
        assert metric.floor < far / 3
        proto = metric.protocol()
        assert proto["metric"] == name and proto["reference_size"] == 500
    auto = build_metric(ecfg(), data)
    assert auto.name == "energy"


# -- the digits classifier ------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("evalcache")


@pytest.fixture(scope="session")
def classifier(cache_dir):
    return digits_fd.load_classifier(digits_fd.ClassifierRecipe(), str(cache_dir))


def test_digits_classifier_is_accurate_and_cached(classifier, cache_dir, monkeypatch):
    net, info = classifier
    assert info["accuracy"] > 0.9 and info["num_test"] == 297
    path = Path(info["path"])
    assert path.parent == cache_dir and path.name == f"digits_classifier-{digits_fd.ClassifierRecipe().key()}.pt"
    monkeypatch.setattr(digits_fd, "train_classifier", lambda r: pytest.fail("retrained despite the cache"))
    again, info2 = digits_fd.load_classifier(digits_fd.ClassifierRecipe(), str(cache_dir))
    assert info2["accuracy"] == info["accuracy"]
    for p, q in zip(net.parameters(), again.parameters()):
        assert torch.equal(p, q)
    assert digits_fd.ClassifierRecipe(seed=1).key() != digits_fd.ClassifierRecipe().key()


def test_digits_classifier_training_is_deterministic():
    recipe = digits_fd.ClassifierRecipe(epochs=1)
    state = torch.get_rng_state()
    a, b = digits_fd.train_classifier(recipe), digits_fd.train_classifier(recipe)
    assert torch.equal(torch.get_rng_state(), state)              # the caller's RNG is left alone
    assert a["accuracy"] == b["accuracy"]
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k


def test_digits_fd_floor_and_protocol(classifier, cache_dir):
    from harness.data import load_dataset
    data = load_dataset(DataConfig(name="digits"))
    metric = build_metric(ecfg(num_samples=500, cache_dir=str(cache_dir)), data, data_cfg=DataConfig())
    assert metric.name == "digits_fd"
    noise = metric(torch.rand(500, 1, 8, 8) * 2 - 1)
    assert 0 < metric.floor < noise / 10
    # the floor is the held-out digits against 500 training digits, in the classifier's features
    feats = lambda x: classifier[0].body(x).double().numpy()     # noqa: E731
    with torch.no_grad():
        idx = torch.randperm(len(data.x), generator=torch.Generator().manual_seed(0))[:500]
        expected = frechet_distance(feats(data.x[idx]), feats(data.heldout_x))
    assert metric.floor == pytest.approx(expected, rel=1e-9)
    proto = metric.protocol()
    assert proto["classifier_accuracy"] == classifier[1]["accuracy"]
    assert proto["reference_size"] == 297 and "digits classifier" in proto["feature_extractor"]


# -- FID through clean-fid, with a stand-in extractor ------------------------------------------------------
class StandIn(torch.nn.Module):
    """A tiny fixed extractor with clean-fid's contract: float [B, 3, H, W] in [0, 255] -> [B, 12]."""

    def __init__(self):
        super().__init__()
        self.pool = torch.nn.AdaptiveAvgPool2d(4)
        self.proj = torch.nn.Linear(48, 12)
        torch.nn.init.normal_(self.proj.weight, generator=torch.Generator().manual_seed(0))
        torch.nn.init.zeros_(self.proj.bias)
        self.calls = 0

    def forward(self, x):
        self.calls += len(x)
        return torch.tanh(self.proj(self.pool(x / 255.0).flatten(1)))


def _images(n, seed, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    base = torch.linspace(-1, 1, 8).reshape(1, 1, 1, 8)
    x = base + 0.3 * torch.randn(n, 3, 8, 8, generator=g) + shift
    return x.clamp(-1, 1)


def _fake_cifar(n_train=60, n_held=40):
    x, h = _images(n_train, 0), _images(n_held, 1)
    return Dataset(name="cifar10", x=x, y=None, heldout_x=h, heldout_y=None, num_classes=0, shape=(3, 8, 8))


def _png_folder(images, folder):
    from PIL import Image
    folder.mkdir()
    for i, img in enumerate(fid.to_uint8(images)):
        Image.fromarray(img).save(folder / f"{i:04d}.png")
    return str(folder)


@pytest.mark.parametrize("mode", ["clean", "legacy_tensorflow"])
def test_fid_with_stand_in_extractor_matches_cleanfid(tmp_path, mode):
    """Our in-memory path against clean-fid's own: PNG folders through compute_fid(custom_feat_extractor=...)."""
    from cleanfid.fid import compute_fid
    data, model = _fake_cifar(), StandIn()
    cfg = ecfg(num_samples=30, fid_reference="train", fid_mode=mode, cache_dir=str(tmp_path / "cache"))
    metric = fid.FID(cfg, data, "cpu", DataConfig(name="cifar10"), extractor=model, extractor_name="stand-in")
    samples = _images(30, 2, shift=0.3)
    value = metric(samples)
    expected = compute_fid(_png_folder(samples, tmp_path / "g"), _png_folder(data.x, tmp_path / "r"), mode=mode,
                           custom_feat_extractor=model, num_workers=0, batch_size=16, device=torch.device("cpu"),
                           verbose=False)
    assert value == pytest.approx(expected, rel=1e-6)
    assert value > 3 * metric.floor > 0
    proto = metric.protocol()
    assert proto["mode"] == mode and proto["feature_extractor"] == "stand-in"
    assert proto["reference"] == "cifar10 train (60)" and proto["reference_size"] == 60
    assert proto["floor_set"].startswith("held-out") and proto["reference_stats"].endswith(".npz")


def test_fid_reference_statistics_are_cached(tmp_path):
    data, cache = _fake_cifar(), tmp_path / "cache"
    cfg = ecfg(num_samples=20, fid_reference="train", cache_dir=str(cache))
    first = fid.FID(cfg, data, "cpu", DataConfig(name="cifar10"), extractor=StandIn(), extractor_name="s")
    first.prepare()
    files = list(cache.glob("fid_stats-cifar10-train-clean-*.npz"))
    assert len(files) == 1
    with np.load(files[0]) as f:
        assert int(f["num"]) == 60 and np.allclose(f["mu"], first.ref_mu)
    model = StandIn()
    second = fid.FID(cfg, data, "cpu", DataConfig(name="cifar10"), extractor=model, extractor_name="s")
    second.prepare()
    assert model.calls == 20                        # the floor's 20 held-out images only: reference from cache
    np.testing.assert_array_equal(second.ref_sigma, first.ref_sigma)
    other = fid.FID(cfg, data, "cpu", DataConfig(name="cifar10", path="/elsewhere"), extractor=StandIn(),
                    extractor_name="s")
    other.prepare()                                 # another data source: another cache entry
    assert len(list(cache.glob("fid_stats-*.npz"))) == 2


def test_fid_reads_reference_npz_and_cleanfid_custom_stats(tmp_path, monkeypatch):
    data = _fake_cifar()
    mu, sigma = np.zeros(12), np.eye(12)
    np.savez(tmp_path / "ref.npz", mu=mu, sigma=sigma)
    metric = fid.FID(ecfg(num_samples=20, fid_reference=str(tmp_path / "ref.npz")), data, "cpu",
                     extractor=StandIn(), extractor_name="s")
    metric.prepare()
    assert metric.reference_kind == "file" and metric.reference_size is None
    np.testing.assert_array_equal(metric.ref_sigma, sigma)
    np.savez(tmp_path / "wide.npz", mu=np.zeros(2048), sigma=np.eye(2048))   # Inception's size, not the stand-in's
    wide = fid.FID(ecfg(num_samples=20, fid_reference=str(tmp_path / "wide.npz")), data, "cpu", extractor=StandIn())
    with pytest.raises(MetricError, match="2048-d features"):
        wide.prepare()
    import cleanfid
    monkeypatch.setattr(cleanfid, "__file__", str(tmp_path / "cleanfid" / "__init__.py"))
    (tmp_path / "cleanfid" / "stats").mkdir(parents=True)
    np.savez(tmp_path / "cleanfid" / "stats" / "mine_clean_custom_na.npz", mu=mu + 1, sigma=sigma)
    custom = fid.FID(ecfg(num_samples=20, fid_reference="custom:mine"), data, "cpu", extractor=StandIn())
    custom.prepare()
    np.testing.assert_array_equal(custom.ref_mu, mu + 1)
    np.savez(tmp_path / "cleanfid" / "stats" / "cifar10_clean_train_8.npz", mu=mu + 2, sigma=sigma, num=50000)
    auto = fid.FID(ecfg(num_samples=20), data, "cpu", extractor=StandIn())
    auto.prepare()
    assert auto.reference_kind == "registry" and auto.reference_size == 50000
    np.testing.assert_array_equal(auto.ref_mu, mu + 2)


@pytest.mark.parametrize("kw, names", [
    ({"inception_path": "/nowhere/inception-2015-12-05.pt"}, ["inception-2015-12-05.pt", "eval.inception_path"]),
    ({"fid_reference": "registry"}, ["cifar10_clean_train_8.npz", "eval.fid_reference"]),
    ({"fid_reference": "/nowhere/ref.npz"}, ["/nowhere/ref.npz", "eval.fid_reference"]),
    ({"fid_reference": "custom:nothing"}, ["nothing_clean_custom_na.npz", "eval.fid_reference"]),
])
def test_fid_missing_files_are_one_line_errors(tmp_path, kw, names):
    extractor = None if "inception_path" in kw else StandIn()
    with pytest.raises(MetricError) as err:
        fid.FID(ecfg(**kw), _fake_cifar(), "cpu", extractor=extractor)
    msg = str(err.value)
    assert "\n" not in msg and all(n in msg for n in names), msg


def test_fid_default_inception_location_is_cleanfids_cache():
    assert fid.inception_file(ecfg()) == Path("/tmp/inception-2015-12-05.pt")


@pytest.mark.parametrize("override, text", [
    ("eval.metric=bogus", "eval.metric='bogus' is not valid"),
    ("eval.metric=energy", "does not apply to data=digits"),
    ("eval.fid_mode=legacy_pytorch", "eval.fid_mode='legacy_pytorch' is not valid"),
    ("eval.fid_reference=nonsense", "eval.fid_reference='nonsense' is not valid"),
])
def test_bad_eval_config_is_refused_at_compose(override, text):
    with pytest.raises(ConfigError, match=text):
        compose(["data=digits", "model=unet-xs", override])


# -- python -m harness.evaluate -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, cache_dir, classifier):
    from harness.train.cli import run
    run_dir = tmp_path_factory.mktemp("evalrun") / "edm"
    result = run(compose(["data=digits", "model=unet-xs", "method=edm", "trainer.batch_size=32", "trainer.threads=1",
                          "trainer.steps=3", "eval.num_samples=100", "eval.steps=[1]", "eval.grid=false",
                          f"eval.cache_dir={cache_dir}", f"run_dir={run_dir}"]))
    assert result["status"] == "completed", result.get("traceback")
    return run_dir, result


def test_training_scores_carry_the_protocol(tiny_run, classifier):
    _, result = tiny_run
    (rec,) = result["scores"]
    assert rec["metric"] == "digits_fd" and rec["classifier_accuracy"] == classifier[1]["accuracy"]
    for key in ("step", "ema", "steps", "nfe", "value", "floor", "reference", "num_samples", "seed", "sample_sec",
                "feature_extractor", "reference_size"):
        assert key in rec, key


def _snapshot(run_dir):
    return {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_evaluate_cli_writes_beside_the_run_and_keeps_each_protocol(tiny_run, capsys):
    """A re-score by another protocol (here 60 samples) goes to evaluate-<protocol>.json, a second one
    (another metric) to its own file, the first kept; the run's own protocol goes to evaluate.json.
    Nothing else in the run directory changes."""
    from harness.eval.evaluate import main
    run_dir, result = tiny_run
    before = _snapshot(run_dir)
    assert main([str(run_dir), "--num-samples", "60", "--steps", "1", "2", "0"]) == 0
    [first] = run_dir.glob("evaluate-num_samples60-*.json")
    out = json.loads(first.read_text())
    assert out["protocol"]["changes"] == {"eval.num_samples": 60} and out["file"] == first.name
    scores = out["scores"]
    assert [(s["steps"], s["nfe"]) for s in scores] == [(1, 1), (2, 3), (18, 35)]   # EDM Heun: 2N - 1 NFE
    for s in scores:
        assert s["metric"] == "digits_fd" and s["num_samples"] == 60 and s["step"] == 3
        assert s["checkpoint"] == "step-0000003" and s["ema"] == result["scores"][0]["ema"]
        assert math.isfinite(s["value"]) and s["floor"] > 0 and s["sample_sec"] > 0
        assert s["protocol"] == out["protocol"]["id"]
    assert scores[0]["floor"] == pytest.approx(scores[1]["floor"])
    assert main([str(run_dir), "--num-samples", "60", "--steps", "1", "--metric", "pixel_fd"]) == 0
    [second] = set(run_dir.glob("evaluate-*.json")) - {first}
    assert [s["metric"] for s in json.loads(second.read_text())["scores"]] == ["pixel_fd"]
    assert json.loads(first.read_text()) == out                     # kept as it was
    assert main([str(run_dir), "--steps", "1"]) == 0                # the run's own protocol
    own = json.loads((run_dir / "evaluate.json").read_text())
    assert own["protocol"] == {"id": "run", "changes": {}} and own["scores"][0]["num_samples"] == 100
    after = _snapshot(run_dir)
    for path in (first, second, run_dir / "evaluate.json"):
        del after[path]
    assert after == before
    assert main([str(run_dir), "--num-samples", "60", "eval.num_samples=70"]) == 2
    assert "--num-samples 60 and eval.num_samples=70 disagree" in capsys.readouterr().err


def test_evaluate_cli_refuses_missing_inception_before_sampling(tiny_run, capsys, tmp_path):
    from harness.eval.evaluate import main
    run_dir, _ = tiny_run
    assert main([str(run_dir), "--metric", "fid", f"eval.inception_path={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "inception-2015-12-05.pt" in err and "eval.inception_path" in err


def test_evaluate_cli_bad_run_dir(tmp_path, capsys):
    from harness.eval.evaluate import main
    assert main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.yaml").write_text(OmegaConf.to_yaml(compose(["data=digits", "model=unet-xs"])))
    assert main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no checkpoint" in err


def test_training_with_missing_inception_fails_before_any_step(tmp_path):
    from harness.train.cli import run
    run_dir = tmp_path / "run"
    result = run(compose(["data=digits", "model=unet-xs", "trainer.steps=2", "eval.metric=fid",
                          f"eval.inception_path={tmp_path}", f"run_dir={run_dir}"]))
    assert result["status"].startswith("failed: MetricError: FID needs clean-fid's Inception weights")
    assert "eval.inception_path" in result["status"] and "\n" not in result["status"]
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.jsonl").exists()


@pytest.fixture(scope="module")
def tiny_ect_run(tmp_path_factory, cache_dir, classifier):
    from harness.train.cli import run
    run_dir = tmp_path_factory.mktemp("evalrun") / "ect"
    result = run(compose(["data=digits", "model=unet-xs", "method=ect", "trainer.batch_size=32", "trainer.threads=1",
                          "trainer.steps=2", "eval.at_end=false", f"eval.cache_dir={cache_dir}",
                          f"run_dir={run_dir}"]))
    assert result["status"] == "completed", result.get("traceback")
    return run_dir


def test_evaluate_cli_rescores_with_a_sampler_setting_and_with_the_search(tiny_ect_run, capsys):
    from harness.eval.evaluate import main
    run_dir = tiny_ect_run
    def newest_rescore():
        return json.loads(max(run_dir.glob("evaluate-*.json"), key=lambda p: p.stat().st_mtime_ns).read_text())
    assert main([str(run_dir), "--num-samples", "60", "--steps", "2", "method.mid_t=[1.5]"]) == 0
    rescore = newest_rescore()
    (fixed,) = rescore["scores"]
    assert fixed["mid_t"] == [1.5] and "selection_value" not in fixed
    assert rescore["protocol"]["changes"] == {"eval.num_samples": 60, "method.mid_t": [1.5]}
    assert main([str(run_dir), "--num-samples", "60", "--steps", "1", "2", "eval.selection=true",
                 "eval.mid_sigma_grid=[0.4,1.5]"]) == 0
    one, two = newest_rescore()["scores"]
    assert two["mid_sigma"] in (0.4, 1.5) and two["mid_t"] == [two["mid_sigma"]]      # ECT: t = sigma
    assert two["selection_value"] == min(two["mid_sigma_tried"]) and len(two["mid_sigma_tried"]) == 2
    assert math.isfinite(one["selection_value"]) and "mid_t" not in one
    if two["mid_sigma"] == 1.5:                                 # the chosen mid-point reproduces its score
        assert two["value"] == pytest.approx(fixed["value"], rel=1e-9)


@pytest.mark.parametrize("override,text", [
    ("method.nope=1", "unknown config key 'method.nope'; valid keys in method: name, "),
    ("method.name=ct", "method.name cannot change when re-scoring: the checkpoint is a ect run"),
    ("trainer.lr=1", "only eval.KEY=VALUE and method.KEY=VALUE"),
    ("eval.mid_sigma_grid=[1.0]", "eval.mid_sigma_grid needs eval.selection=true"),
])
def test_evaluate_cli_refuses_bad_overrides_in_one_line(tiny_ect_run, capsys, override, text):
    from harness.eval.evaluate import main
    before = _snapshot(tiny_ect_run)
    assert main([str(tiny_ect_run), override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and text in err
    assert _snapshot(tiny_ect_run) == before
