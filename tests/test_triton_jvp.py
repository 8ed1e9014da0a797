"""The Triton JVP-attention kernel on this CPU under TRITON_INTERPRET=1 (set before Triton decorates the
kernel, hence subprocesses): its y, t_y and log-sum-exp against float64 references, and the whole
jvp_flash test file (torch.func.jvp through attention and through networks) run on the kernel."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "TRITON_INTERPRET": "1"}

CHECK = r"""
import json, math, torch
from harness.nets.jvp_attention import attention_jvp_blockwise
from harness.nets.triton_jvp_attention import attention_jvp_triton
out = []
for b, h, n, d, bm, bn in [(1, 1, 1, 8, 32, 32), (2, 3, 33, 16, 32, 32), (1, 2, 64, 64, 16, 32), (2, 2, 70, 24, 32, 16)]:
    g = torch.Generator().manual_seed(n)
    t = [torch.randn(b, h, n, d, generator=g) for _ in range(6)]
    y, ty, lse = attention_jvp_triton(*t, block_m=bm, block_n=bn)
    y0, ty0 = attention_jvp_blockwise(*[x.double() for x in t])
    lse0 = torch.logsumexp(t[0].double() @ t[1].double().transpose(-2, -1) / math.sqrt(d), -1)
    out.append([(y - y0).abs().max().item(), (ty - ty0).abs().max().item(), (lse - lse0).abs().max().item()])
print(json.dumps(out))
"""


def test_kernel_outputs_match_float64_references():
    proc = subprocess.run([sys.executable, "-c", CHECK], env=ENV, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(errors) == 4
    for y_err, ty_err, lse_err in errors:       # lengths 1, 33, 64, 70; head dims 8..64; ragged blocks
        assert y_err < 1e-5 and ty_err < 1e-5 and lse_err < 1e-5


@pytest.mark.slow
def test_jvp_flash_tests_pass_on_the_kernel():
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(ROOT / "tests" / "test_jvp_attention.py")], env=ENV, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout
