"""Issue 17: a run you can watch. A 20-step digits run prints a progress line per log interval (step,
loss, the method's main scalar, images/s, elapsed, ETA, then its scores) and writes TensorBoard event
files that TensorBoard's own reader gives back with metrics.jsonl's values; `log.console=quiet` prints
none of it."""
import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from harness.train.cli import run
from harness.train.watch import Console


@pytest.fixture(scope="module")
def watched(tmp_path_factory):
    """One 20-step ECT run with console lines (caplog cannot be module-scoped: the records are kept here)."""
    import logging
    from harness.config import compose
    run_dir = tmp_path_factory.mktemp("watch") / "run"
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("harness.train.progress")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        result = run(compose(["method=ect", "model=unet-xs", "data=digits", "trainer.steps=20",
                              "trainer.batch_size=32", "trainer.threads=1", "trainer.log_every_steps=5",
                              "eval.num_samples=100", "log.console=lines", f"run_dir={run_dir}"]))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert result["status"] == "completed"
    return run_dir, [r.getMessage() for r in records], result


def test_progress_lines(watched):
    _, lines, result = watched
    assert [line.split(" | ")[0] for line in lines[:4]] == ["step 5/20", "step 10/20", "step 15/20", "step 20/20"]
    metrics = [json.loads(s) for s in (watched[0] / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if "loss" in m]
    for line, rec in zip(lines, train):
        fields = line.split(" | ")
        assert fields[1] == f"loss {rec['loss']:.4g}" and fields[2] == f"ect/stage {rec['ect/stage']:.4g}"
        assert fields[3] == f"{rec['time/images_per_sec']:.0f} img/s"
        assert fields[4].startswith("elapsed 0:00:") and fields[5].startswith("ETA 0:00:")
    assert lines[3].split(" | ")[5] == "ETA 0:00:00"
    scores = ", ".join(f"{s['metric']} {s['value']:.4g} ({s['ema']}, NFE {s['nfe']})" for s in result["scores"])
    assert lines[4] == f"step 20 scores: {scores}" and len(lines) == 5


def test_tensorboard_holds_what_metrics_jsonl_holds(watched):
    run_dir, _, result = watched
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0,
                                                                             "tensors": 0})
    events.Reload()
    metrics = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if "loss" in m]
    for key in ("loss", "ect/stage", "lr", "time/images_per_sec", "flops/train_total", "mem/peak_gb"):
        got = [(e.step, e.value) for e in events.Scalars(key)]
        assert [s for s, _ in got] == [m["step"] for m in train] == [5, 10, 15, 20]
        assert [v for _, v in got] == pytest.approx([m[key] for m in train], rel=1e-6)   # stored as float32
    for s in result["scores"]:
        [event] = events.Scalars(f"score/{s['metric']}/{s['ema']}/nfe{s['nfe']}")
        assert (event.step, event.value) == (20, pytest.approx(s["value"], rel=1e-6))
    assert sorted(events.Tags()["images"]) == ["samples/samples_ema_std0.05_1step",
                                               "samples/samples_ema_std0.05_2step"]
    [config] = events.Tensors("config/text_summary")
    assert b"name: ect" in config.tensor_proto.string_val[0]


def test_quiet_prints_no_progress(compose_run, caplog):
    with caplog.at_level("INFO", logger="harness.train.progress"):
        assert run(compose_run("method=edm", "trainer.steps=4", "trainer.log_every_steps=1", "log.console=quiet",
                               "log.tensorboard=false"))["status"] == "completed"
    assert [r for r in caplog.records if r.name == "harness.train.progress"] == []


def test_eta_is_the_mean_step_time_of_this_session_times_the_steps_left(monkeypatch):
    """Resumed at step 100 of 1000, 90 s after starting, at step 400: 300 steps took 90 s, 600 are left."""
    clock = iter([1000.0, 1090.0])
    monkeypatch.setattr("harness.train.watch.time.perf_counter", lambda: next(clock))
    console = Console("lines", total=1000, start=100)
    console.latest_score = "digits_fd 12.5 (ema_std0.05, NFE 2)"
    line = console.line(400, {"loss": 0.123456, "cm/num_scales": 17.0, "time/images_per_sec": 1234.4},
                        "cm/num_scales")
    assert line == ("step 400/1000 | loss 0.1235 | cm/num_scales 17 | 1234 img/s | elapsed 0:01:30 | "
                    "ETA 0:03:00 | digits_fd 12.5 (ema_std0.05, NFE 2)")
