"""Our training steps against the public implementations', side by side in one run.

    python benchmarks/peers.py --ect PATH [--fastgen PATH --fastgen-python PY] [--channels 32 64] [--rounds 5]

`--ect` (or $CMBENCH_ECT) is a checkout of locuslab/ect, `--fastgen` ($CMBENCH_FASTGEN) one of NVlabs/FastGen,
read, never copied into this project. FastGen runs under its own environment (`--fastgen-python`,
$CMBENCH_FASTGEN_PYTHON), made with the same torch as this project's, so all three run the same kernels:

    python3 -m venv /tmp/fgvenv
    /tmp/fgvenv/bin/pip install "torch==2.14.1" "numpy<2" "pandas<2.3" diffusers==0.35.1 transformers==4.49.0 \
        "wandb[media]" boto3 ftfy loguru einops timm imageio webdataset accelerate safetensors scipy hydra-core \
        tqdm attrs omegaconf av opencv-python-headless sentencepiece nvidia-ml-py

The network is the same in every codebase: DDPM++ / SongUNet on 1x8x8 digits-shaped batches of 128,
`channels` wide, multipliers [1, 2], one block per level, attention at 4x4, dropout 0.2, positional noise
embedding, fp32 (about 0.749M parameters at 32 channels in all three).

  cmbench ect, sct   harness.train.trainer.Trainer.step: DeepSpeed engine step, the method's loss, the
                     default EDM2 power EMA (what a run pays per step)
  locuslab ect       its ECMLoss (stage 3 of its schedule) on its ECMPrecond(SongUNet), RAdam at 1e-4,
                     the gradient nan_to_num and the EMA update of its training loop (ct_training_loop.py);
                     its dropout-mask replay uses torch.cuda's RNG state, mapped to the CPU generator here
  fastgen cm, scm    its CMModel (ECT-style) and SCMModel on its EDMPrecond(SongUNet): single_train_step,
                     backward, optimizers_schedulers_step (as its tests drive them), and one EMA lerp per
                     parameter, as its EMA callback does

Each (round, width, implementation) is a fresh process with 2 torch threads that times `steps` steps after
3 untimed ones; the processes of a round run one after another and rounds interleave, so machine noise
hits every implementation alike. Writes results/bench/peers.json: every round's median step time, the
ratios ours / peer per round and their medians, and the peers' commits.

`--matched-malloc` also times each peer under the malloc thresholds our trainer sets for itself
(harness/train/malloc.py), as `<peer>+malloc`, with the ratios to those beside (`*_matched_malloc`): how much
of the difference is that setting, which a peer's user could have too (MALLOC_MMAP_THRESHOLD_ and
MALLOC_TRIM_THRESHOLD_ in glibc's environment).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "results" / "bench" / "peers.json"
BATCH, WARMUP = 128, 3
IMPLS = ("cmbench-ect", "locuslab-ect", "cmbench-sct")
FASTGEN_IMPLS = ("fastgen-cm", "fastgen-scm")


def _digits_batch():
    from harness.data import DataConfig, load_dataset
    return load_dataset(DataConfig(name="digits")).x[:BATCH]


def _time(step, steps: int) -> list[float]:
    out = []
    for i in range(steps + WARMUP):
        tic = time.perf_counter()
        step(i)
        if i >= WARMUP:
            out.append(time.perf_counter() - tic)
    return out


def _cmbench(method: str, channels: int, steps: int) -> dict:
    from benchmarks.step_cost import SHARED
    from harness.config import compose
    from harness.train import engine as eng
    from harness.train.rundir import RunDir
    from harness.train.trainer import Trainer
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose([*SHARED, "model=ddpmpp-xs", f"model.channels={channels}", "model.channel_mult=[1,2]",
                       "model.num_blocks=1", "model.attn_resolutions=[4]", "model.dropout=0.2", f"method={method}",
                       f"trainer.steps={steps + WARMUP}", "trainer.device=cpu", "log.console=quiet",
                       "log.tensorboard=false", f"run_dir={tmp}/run"])
        run_dir = RunDir(cfg.run_dir)
        run_dir.prepare(cfg)
        trainer = Trainer(cfg, run_dir, eng.setup_distributed("cpu"))
        secs = _time(trainer.step, steps)
        params = trainer.num_params
        trainer.close()
    return {"secs": secs, "params": params}


def _locuslab_ect(path: str, channels: int, steps: int) -> dict:
    import copy

    import torch
    sys.path.insert(0, path)
    torch.cuda.get_rng_state, torch.cuda.set_rng_state = torch.get_rng_state, torch.set_rng_state
    from training.loss import ECMLoss
    from training.networks import ECMPrecond
    torch.manual_seed(0)
    net = ECMPrecond(img_resolution=8, img_channels=1, label_dim=0, model_type="SongUNet", model_channels=channels,
                     channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.2)
    net.train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    loss_fn = ECMLoss()
    loss_fn.update_schedule(3)
    optimizer = torch.optim.RAdam(net.parameters(), lr=1e-4)
    images = _digits_batch()
    ema_beta = 0.5 ** (BATCH / 500_000)           # its default ema_halflife_kimg = 500

    def step(_):
        optimizer.zero_grad(set_to_none=True)
        loss_fn(net=net, images=images).mean().backward()
        for param in net.parameters():
            if param.grad is not None:
                torch.nan_to_num(param.grad, nan=0, posinf=1e5, neginf=-1e5, out=param.grad)
        optimizer.step()
        with torch.no_grad():
            for p_ema, p_net in zip(ema.parameters(), net.parameters()):
                p_ema.copy_(p_net.detach().lerp(p_ema, ema_beta))
    secs = _time(step, steps)
    return {"secs": secs, "params": sum(p.numel() for p in net.parameters())}


def _fastgen(path: str, method: str, channels: int, steps: int) -> dict:
    """FastGen's CM / sCM model driven as its own tests drive it (tests/test_cmmodel.py)."""
    import torch
    sys.path.insert(0, path)
    from fastgen.configs.config_utils import override_config_with_opts
    if method == "cm":
        from fastgen.configs.methods.config_cm import ModelConfig
        from fastgen.methods import CMModel as Model
    else:
        from fastgen.configs.methods.config_scm import ModelConfig
        from fastgen.methods import SCMModel as Model
    torch.manual_seed(0)
    config = ModelConfig()
    config.net = override_config_with_opts(config.net, [
        "-", "img_resolution=8", "img_channels=1", "label_dim=0", "augment_dim=0", f"model_channels={channels}",
        "channel_mult=[1,2]", "+num_blocks=1", "+attn_resolutions=[4]", "dropout=0.2"])
    config.device, config.precision = torch.device("cpu"), "float32"
    config.pretrained_model_path, config.input_shape = "", [1, 8, 8]
    model = Model(config)
    model.on_train_begin()
    model.init_optimizers()
    data = {"real": torch.randn(BATCH, 1, 8, 8, generator=torch.Generator().manual_seed(0)), "condition": None,
            "neg_condition": None}
    ema = [p for p in model.ema.parameters()] if getattr(model, "ema", None) is not None else []

    def step(i):
        model.optimizers_zero_grad(i)
        loss_map, _ = model.single_train_step(data, i)
        model.grad_scaler.scale(loss_map["total_loss"]).backward()
        model.optimizers_schedulers_step(i)
        with torch.no_grad():
            for p_ema, p_net in zip(ema, model.net.parameters()):
                p_ema.lerp_(p_net.detach(), 1 - 0.9999)
    secs = _time(step, steps)
    return {"secs": secs, "params": sum(p.numel() for p in model.net.parameters())}


def child(impl: str, channels: int, steps: int, peer: str) -> dict:
    import torch
    torch.set_num_threads(2)
    impl, _, variant = impl.partition("+")
    if variant == "malloc":           # a peer under the malloc thresholds our trainer sets (harness/train/malloc.py)
        from harness.train.malloc import keep_freed_memory
        assert keep_freed_memory(), "glibc's mallopt refused the thresholds"
    if impl == "locuslab-ect":
        return _locuslab_ect(peer, channels, steps)
    if impl.startswith("fastgen-"):
        return _fastgen(peer, impl.split("-", 1)[1], channels, steps)
    return _cmbench(impl.split("-", 1)[1], channels, steps)


def _in_child(impl: str, channels: int, steps: int, peer: str, python: str = sys.executable) -> dict:
    from launchers.base import RENDEZVOUS_ENV
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_ENV}
    env |= {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    code = (f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); from benchmarks.peers import child; "
            f"print('RESULT ' + json.dumps(child({impl!r}, {channels}, {steps}, {peer!r})))")
    out = subprocess.run([python, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not lines:
        raise RuntimeError(f"{impl} ({channels} channels) failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def _commit(path: str) -> str:
    out = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown (not a git checkout)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ect", default=os.environ.get("CMBENCH_ECT", ""), help="locuslab/ect checkout")
    parser.add_argument("--fastgen", default=os.environ.get("CMBENCH_FASTGEN", ""), help="NVlabs/FastGen checkout")
    parser.add_argument("--fastgen-python", default=os.environ.get("CMBENCH_FASTGEN_PYTHON", ""),
                        help="the python of FastGen's own environment (docstring)")
    parser.add_argument("--channels", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--rounds", type=int, default=5)      # 3 left the median at the mercy of one noisy round here
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--matched-malloc", action="store_true",
                        help="also time each peer under the malloc thresholds our trainer sets (`<peer>+malloc`)")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    if not args.ect or not (Path(args.ect) / "training" / "loss.py").is_file():
        print(f"error: --ect PATH (or CMBENCH_ECT) must name a checkout of locuslab/ect with training/loss.py "
              f"(got {args.ect!r}); git clone https://github.com/locuslab/ect PATH", file=sys.stderr)
        return 2
    if args.fastgen and not (Path(args.fastgen) / "fastgen" / "methods" / "consistency_model").is_dir():
        print(f"error: --fastgen PATH must name a checkout of NVlabs/FastGen (got {args.fastgen!r})", file=sys.stderr)
        return 2
    if args.fastgen and not args.fastgen_python:
        print("error: --fastgen needs --fastgen-python PY, the python of FastGen's own environment (see this "
              "file's docstring for the commands that make it)", file=sys.stderr)
        return 2
    impls = IMPLS + (FASTGEN_IMPLS if args.fastgen else ())
    if args.matched_malloc:
        impls += tuple(f"{i}+malloc" for i in impls if not i.startswith("cmbench-"))
    medians: dict[str, dict[str, list[float]]] = {str(c): {i: [] for i in impls} for c in args.channels}
    params: dict[str, dict[str, int]] = {str(c): {} for c in args.channels}
    for r in range(args.rounds):
        for c in args.channels:
            for impl in impls:
                fastgen = impl.startswith("fastgen-")
                got = _in_child(impl, c, args.steps, args.fastgen if fastgen else args.ect,
                                args.fastgen_python if fastgen else sys.executable)
                medians[str(c)][impl].append(1000 * statistics.median(got["secs"]))
                params[str(c)][impl] = got["params"]
                print(f"round {r + 1} channels {c} {impl}: {medians[str(c)][impl][-1]:.1f} ms", flush=True)
    widths = {}
    for c, rows in medians.items():
        widths[c] = {"median_ms_per_round": rows, "params": params[c]}
        pairs = [("ect_ratio_to_locuslab_ect", "cmbench-ect", "locuslab-ect")]
        if args.fastgen:
            pairs += [("ect_ratio_to_fastgen_cm", "cmbench-ect", "fastgen-cm"),
                      ("sct_ratio_to_fastgen_scm", "cmbench-sct", "fastgen-scm")]
        if args.matched_malloc:
            pairs += [(name + "_matched_malloc", ours, theirs + "+malloc") for name, ours, theirs in pairs]
        for name, ours, theirs in pairs:
            per_round = [a / b for a, b in zip(rows[ours], rows[theirs])]
            widths[c][name + "_per_round"] = per_round
            widths[c][name] = statistics.median(per_round)
            print(f"channels {c}: {ours} / {theirs} = {widths[c][name]:.3f} "
                  f"(rounds {', '.join(f'{x:.3f}' for x in per_round)})")
    result = {"widths": widths, "batch": BATCH, "steps_timed": args.steps, "rounds": args.rounds, "threads": 2,
              "precision": "fp32", "device": "cpu", "matched_malloc": args.matched_malloc,
              "peers": {"locuslab/ect": _commit(args.ect),
                        **({"NVlabs/FastGen": _commit(args.fastgen)} if args.fastgen else {})},
              "torch": __import__("torch").__version__, "machine": platform.machine()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
