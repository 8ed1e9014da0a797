"""Issue 17: `log.wandb=offline` records what metrics.jsonl records. The offline run file is read back
with a reader written here from the format (LevelDB's log: a 7-byte ':W&B' header, 32 KiB blocks of
records with a 7-byte header each, FULL / FIRST / MIDDLE / LAST pieces) and wandb's own protobuf
`Record`, so the test does not depend on a reader wandb no longer ships."""
import json
import struct

from wandb.proto import wandb_internal_pb2 as pb      # wandb is in the test extra: pip install -e '.[test]'

from harness.train.cli import run

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path):
    data = path.read_bytes()
    assert data[:7] == b":W&B\xe1\xbe\x00", "not a W&B transaction log (version 0)"
    pos, pieces = 7, []
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:                       # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:                      # zero padding to the end of the block
            pos += left
            continue
        assert kind in (FULL, FIRST, MIDDLE, LAST), f"record piece type {kind} at byte {pos}"
        pieces.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(b"".join(pieces))
            pieces = []
            yield record


def test_offline_wandb_run_holds_metrics_jsonl_scores_samples_and_config(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    result = run(_compose(run_dir))
    assert result["status"] == "completed"
    [log_file] = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    records = list(wandb_records(log_file))

    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    metrics = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if "loss" in m]
    logged = [h for h in history if "loss" in h]
    assert [h["_step"] for h in logged] == [m["step"] for m in train] == [4, 8]
    for key in ("loss", "ect/stage", "lr", "time/images_per_sec"):
        assert [h[key] for h in logged] == [m[key] for m in train]          # JSON both ways: exact
    final = {k: v for h in history if h["_step"] == 8 for k, v in h.items()}
    for s in result["scores"]:
        assert final[f"score/{s['metric']}/{s['ema']}/nfe{s['nfe']}"] == s["value"]
    assert final["samples/samples_ema_std0.05_1step/_type"] == "image-file"

    [run_record] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {item.key: json.loads(item.value_json) for item in run_record.config.update}
    assert config["method"]["name"] == "ect" and config["trainer"]["steps"] == 8
    assert run_record.run_id == "run"


def _compose(run_dir):
    from harness.config import compose
    return compose(["method=ect", "model=unet-xs", "data=digits", "trainer.steps=8", "trainer.batch_size=32",
                    "trainer.threads=1", "trainer.log_every_steps=4", "eval.num_samples=100",
                    "log.console=quiet", "log.tensorboard=false", "log.wandb=offline", f"run_dir={run_dir}"])
