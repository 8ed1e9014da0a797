"""benchmarks/peers.py without the public checkout it compares against says what it needs and exits 2
(the benchmark itself is run by hand: it needs a locuslab/ect checkout and a quiet machine)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.peers import main  # noqa: E402


def test_without_a_checkout_it_says_what_it_needs(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CMBENCH_ECT", raising=False)
    assert main(["--out", str(tmp_path / "peers.json")]) == 2
    assert main(["--ect", str(tmp_path), "--out", str(tmp_path / "peers.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("must name a checkout of locuslab/ect with training/loss.py" in e for e in err)
    assert not (tmp_path / "peers.json").exists()
