"""harness.train.malloc: after keep_freed_memory, large CPU tensors reuse freed memory instead of faulting in
fresh pages each time (counted in the kernel's minor page faults, in a fresh process, so the test process's
own allocator state does not matter); CMBENCH_MALLOC=glibc leaves glibc's defaults; a bad value is one line."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from harness.train import malloc

PROBE = r"""
import json, resource, sys, torch
from harness.train.malloc import keep_freed_memory

def faults():     # minor page faults of 10 allocate-touch-free cycles of a 40 MiB tensor (over glibc's 32 MiB cap)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        torch.empty(10 << 20).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = faults()
applied = keep_freed_memory()
faults()                                    # the first cycle after it grows the heap once
print(json.dumps({"default": default, "applied": applied, "kept": faults()}))
"""
PAGES = (40 << 20) // os.sysconf("SC_PAGE_SIZE")      # pages one 40 MiB tensor touches


def _probe(env_value: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != malloc.ENV}
    if env_value is not None:
        env[malloc.ENV] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(malloc._glibc_mallopt() is None, reason="not glibc: keep_freed_memory does nothing there")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    got = _probe(None)
    assert got["applied"] is True
    assert got["default"] > 5 * PAGES          # glibc's default: every cycle maps and faults in fresh pages
    assert got["kept"] < PAGES // 10           # kept: the same pages again


@pytest.mark.skipif(malloc._glibc_mallopt() is None, reason="not glibc")
def test_cmbench_malloc_glibc_leaves_the_defaults():
    got = _probe("glibc")
    assert got["applied"] is False
    assert got["kept"] > 5 * PAGES


@pytest.mark.parametrize("applied_before", [False, True])
def test_a_bad_cmbench_malloc_is_one_line(monkeypatch, applied_before):
    monkeypatch.setattr(malloc, "_applied", applied_before)   # as after a trainer of this process set it
    monkeypatch.setenv(malloc.ENV, "jemalloc")
    with pytest.raises(ValueError, match=r"^CMBENCH_MALLOC='jemalloc' is not a valid value; valid: keep, glibc$"):
        malloc.keep_freed_memory()


def test_the_train_command_refuses_a_bad_cmbench_malloc_before_writing(monkeypatch, tmp_path, capsys):
    from harness.train.cli import main
    monkeypatch.setenv(malloc.ENV, "tcmalloc")
    out = tmp_path / "run"
    assert main(["method=ect", "data=digits", "model=unet-xs", "trainer.steps=1", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == "error: CMBENCH_MALLOC='tcmalloc' is not a valid value; valid: keep, glibc"
    assert not out.exists()
