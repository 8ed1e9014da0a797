"""Forward + JVP of attention: `jvp_flash` (blockwise online softmax) vs torch.func.jvp over `math` attention.

    python benchmarks/jvp_attention.py [--lengths 256 512 1024 2048 4096] [--heads 4] [--dim 64] [--reps 5]

For each sequence length: peak memory of one forward+JVP, each path in its own fresh subprocess (peak
resident memory, /proc VmHWM reset just before the call, minus the resident memory before it), and the
median time over `reps` calls, the two paths interleaved in this process so machine noise hits both.
Writes results/bench/jvp_attention.json with the ratios (flash / math) per length.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent.parent / "results" / "bench" / "jvp_attention.json"


def _inputs(n: int, heads: int, dim: int):
    gen = torch.Generator().manual_seed(n)
    return [torch.randn(1, heads, n, dim, generator=gen) for _ in range(6)]


def _call(backend: str, tensors):
    from harness.nets.attention import attention
    q, k, v, tq, tk, tv = tensors
    with torch.no_grad():
        return torch.func.jvp(lambda a, b, c: attention(a, b, c, backend), (q, k, v), (tq, tk, tv))


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_memory(backend: str, n: int, heads: int, dim: int) -> int:
    """Child process: bytes of peak resident memory added by one forward+JVP."""
    tensors = _inputs(n, heads, dim)
    _call(backend, _inputs(8, heads, dim))              # warm up code paths, not memory
    Path("/proc/self/clear_refs").write_text("5")       # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    out = _call(backend, tensors)
    peak = _status_kib("VmHWM")
    del out
    return (peak - before) * 1024


def _memory_in_child(backend: str, n: int, heads: int, dim: int) -> int:
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r}); "
            f"from benchmarks.jvp_attention import measure_memory; "
            f"print(measure_memory({backend!r}, {n}, {heads}, {dim}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    rows = []
    for n in args.lengths:
        mem = {b: _memory_in_child(b, n, args.heads, args.dim) for b in ("math", "jvp_flash")}
        tensors = _inputs(n, args.heads, args.dim)
        for backend in ("math", "jvp_flash"):                  # warm-up, untimed
            _call(backend, tensors)
        times: dict[str, list[float]] = {"math": [], "jvp_flash": []}
        for _ in range(args.reps):
            for backend in ("math", "jvp_flash"):
                tic = time.perf_counter()
                _call(backend, tensors)
                times[backend].append(time.perf_counter() - tic)
        med = {b: statistics.median(t) for b, t in times.items()}
        row = {"length": n, "math_peak_bytes": mem["math"], "flash_peak_bytes": mem["jvp_flash"],
               "memory_ratio": mem["jvp_flash"] / mem["math"], "math_median_sec": med["math"],
               "flash_median_sec": med["jvp_flash"], "time_ratio": med["jvp_flash"] / med["math"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"rows": rows, "batch": 1, "heads": args.heads, "head_dim": args.dim, "dtype": "float32",
              "device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
              "machine": platform.machine()}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
