"""One process per run directory and one driver per sweep directory: a second gets a one-line error naming
the holder and writes nothing; the lock of a process that died is taken over."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from harness.train.rundir import LOCK_FILE, RunDirError, exclusive
from processes import shell_env

ROOT = Path(__file__).resolve().parent.parent


def test_second_holder_is_refused_with_the_holder_named(tmp_path):
    with exclusive(tmp_path, "first"):
        with pytest.raises(RunDirError) as info:
            with exclusive(tmp_path, "second"):
                pass
    message = str(info.value)
    assert message.startswith(f"{tmp_path} is in use by first (pid {os.getpid()} on ") and "\n" not in message
    with exclusive(tmp_path, "third"):         # released when the holder's block ends
        assert "third" in (tmp_path / LOCK_FILE).read_text()


def test_lock_of_a_killed_process_is_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from harness.train.rundir import exclusive\n"
        f"with exclusive({str(tmp_path)!r}, 'doomed'):\n    print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True, env=shell_env())
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunDirError, match="in use by doomed"):
        with exclusive(tmp_path, "me"):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait(30)
    with exclusive(tmp_path, "me"):            # the file still says 'doomed', but no one holds it
        assert "me (pid" in (tmp_path / LOCK_FILE).read_text()


def test_train_refuses_a_run_directory_in_use_and_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    with exclusive(run_dir, "another harness.train"):
        proc = subprocess.run([sys.executable, "-m", "harness.train", "data=swissroll", "model=mlp-xs",
                               "trainer.steps=2", "--out", str(run_dir)], capture_output=True, text=True,
                              cwd=tmp_path, env=shell_env(), timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {run_dir} is in use by another harness.train (pid")
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE]     # no config, metrics or result


def test_sweep_driver_refuses_a_sweep_directory_in_use(tmp_path, capsys):
    from harness.sweep.driver import main
    spec = tmp_path / "tiny.yaml"
    spec.write_text("name: tiny\nbase: [data=swissroll, model=mlp-xs, trainer.steps=2]\n"
                    "stages:\n  - {name: s, overrides: [method=ect]}\nlauncher: {name: local}\n")
    with exclusive(tmp_path / "out" / "tiny", "harness.sweep tiny"):
        assert main([str(spec), "--out", str(tmp_path / 'out')]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {tmp_path / 'out' / 'tiny'} is in use by harness.sweep tiny (pid")
    assert sorted(p.name for p in (tmp_path / "out" / "tiny").iterdir()) == [LOCK_FILE]
