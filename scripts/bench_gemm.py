"""f32 matrix products at SmolLM2-135M's projection shapes in torch (`F.linear`, the call HF's
nn.Linear makes), with as many threads as CPUs: the counterpart of worker/benches/gemm.rs.

Usage: python scripts/bench_gemm.py [ROWS] [REPEATS]
Prints `BENCH torch M K N gflops=<2·M·K·N / median seconds / 1e9>`.
"""
import os
import statistics
import sys
import time

import torch


def main() -> None:
    m = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    torch.set_num_threads(os.cpu_count() or 1)
    for k, n in [(576, 576), (576, 192), (576, 1536), (1536, 576), (1024, 1024)]:
        x, w = torch.randn(m, k), torch.randn(n, k)
        with torch.inference_mode():
            for _ in range(3):
                torch.nn.functional.linear(x, w)
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                torch.nn.functional.linear(x, w)
                times.append(time.perf_counter() - t)
        print(f"BENCH torch {m} {k} {n} gflops={2 * m * k * n / statistics.median(times) / 1e9:.1f}")


if __name__ == "__main__":
    main()
