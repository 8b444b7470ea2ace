import os

# Triton picks interpreter vs compiler when kernels are decorated, so this must precede any import
# of triton. GPU runs (DEEPENCODER_KERNELS_GPU_TESTS=1) keep the compiler.
if not os.environ.get("DEEPENCODER_KERNELS_GPU_TESTS"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest
import torch

from deepencoder_kernels import config as cfg


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tolerance(dtype):
    return cfg.TOLERANCES[dtype]


def assert_close(actual, expected, dtype=None, msg=""):
    """assert_close with the package's per-dtype tolerance table; reports the worst element."""
    atol, rtol = cfg.TOLERANCES[dtype or actual.dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol, msg=lambda m: f"{msg}\n{m}")


def small_encoder(seed: int = 0):
    """A narrow DeepEncoder (same code paths, real grids) for fast CPU tests."""
    from deepencoder_kernels.modules import ClipVisionModel, DeepEncoder, MlpProjector, SamEncoder

    torch.manual_seed(seed)
    enc = DeepEncoder(
        sam=SamEncoder(dim=64, depth=3, num_heads=1, global_blocks=(1,), neck_dim=16, out_dim=32),
        clip=ClipVisionModel(dim=32, depth=1, num_heads=2, hidden=64),
        projector=MlpProjector(64, 24),
    )
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if p.dim() <= 2 and "weight" not in name or "rel_pos" in name:
                p.normal_(0, 0.5)
    return enc.eval()
