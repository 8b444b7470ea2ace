"""Shared setup for the benchmarks: real-shape inputs per mode and block type, result files."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from deepencoder_kernels import config as cfg
from deepencoder_kernels.profiler import device_name

# DEEPENCODER_KERNELS_RESULTS: write elsewhere (scripts/gpu_check.sh keeps one machine's results apart)
RESULTS = Path(os.environ.get("DEEPENCODER_KERNELS_RESULTS") or Path(__file__).parent / "results")
MODES = {"tiny": 512, "small": 640, "base": 1024, "large": 1280}


def attention_inputs(mode: str, block: str, batch: int = 1, dtype=torch.bfloat16, device="cpu", seed: int = 0):
    """qkv [B, H, W, 2304], tables as the checkpoint has them ([27, 64] windowed, [127, 64] global), qkv bias."""
    g = torch.Generator().manual_seed(seed)
    side = cfg.sam_grid(MODES[mode])
    C = cfg.SAM_DIM
    rows = 2 * cfg.SAM_WINDOW - 1 if block == "windowed" else 2 * cfg.SAM_POS_GRID - 1
    qkv = torch.randn(batch, side, side, 3 * C, generator=g).mul_(0.5)
    th, tw = (torch.randn(rows, cfg.HEAD_DIM, generator=g).mul_(0.3) for _ in range(2))
    pad = torch.randn(3 * C, generator=g).mul_(0.5)
    to = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    window = cfg.SAM_WINDOW if block == "windowed" else 0
    return to(qkv), to(th), to(tw), cfg.SAM_HEADS, window, to(pad) if window else None


def device_info() -> dict:
    info = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "python": platform.python_version()}
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        pass
    info["device"] = device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    return info


def write_result(name: str, rows: list[dict]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({**device_info(), "rows": rows}, indent=1))
    return path


def do_bench_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100)


@dataclass
class GpuRun:
    """Where the GPU benchmarks run and how they time. The defaults are the real thing; the test
    suite smoke-runs the same code on the CPU (interpreted kernels, one call per "timing") so that
    benchmark code no GPU has executed yet cannot rot."""

    device: str = "cuda"
    fused: str = "triton"                     # backend of the package's kernels
    timer: Callable = do_bench_ms             # fn -> milliseconds
    compile_backend: str = "inductor"
