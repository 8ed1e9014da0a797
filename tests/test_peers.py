"""benchmarks/peers.py without the public checkouts it compares against says what it needs and exits 2
(the benchmark itself is run by hand: it needs the checkouts, FastGen's own environment and a quiet
machine)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.peers import main  # noqa: E402


def test_without_the_checkouts_it_says_what_it_needs(tmp_path, capsys, monkeypatch):
    for var in ("CMBENCH_ECT", "CMBENCH_FASTGEN", "CMBENCH_FASTGEN_PYTHON"):
        monkeypatch.delenv(var, raising=False)
    out = ["--out", str(tmp_path / "peers.json")]
    assert main(out) == 2
    assert main(["--ect", str(tmp_path), *out]) == 2
    ect = tmp_path / "ect"
    (ect / "training").mkdir(parents=True)
    (ect / "training" / "loss.py").touch()
    assert main(["--ect", str(ect), "--fastgen", str(tmp_path), *out]) == 2
    fastgen = tmp_path / "fastgen"
    (fastgen / "fastgen" / "methods" / "consistency_model").mkdir(parents=True)
    assert main(["--ect", str(ect), "--fastgen", str(fastgen), *out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4
    assert all("must name a checkout of locuslab/ect with training/loss.py" in e for e in err[:2])
    assert "--fastgen PATH must name a checkout of NVlabs/FastGen" in err[2]
    assert "--fastgen needs --fastgen-python PY" in err[3]
    assert not (tmp_path / "peers.json").exists()
