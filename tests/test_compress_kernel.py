"""The fused neck + compressor against the reference chain: in Triton's interpreter on CPU, compiled on
CUDA (`pytest -m gpu`) at full channel counts on every mode's grid."""
import pytest
import torch
import torch.nn.functional as F

import deepencoder_kernels as dk
from deepencoder_kernels import reference as ref
from deepencoder_kernels.kernels.compress import conv_nhwc
from deepencoder_kernels.modules import Compressor, SamEncoder
from deepencoder_kernels.ops.compress import kkio
from conftest import assert_close, by_device, fused_backend

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


FULL = (768, 256, 512, 1024)   # DeepEncoder's channels: trunk, neck, net_2, net_3
FULL_V2 = (768, 256, 512, 896)   # DeepEncoder V2's: net_3 goes to 896


def make_args(B, H, W, cin, cn, c2, c3, dtype, nan_margin=False, device="cpu"):
    x = torch.randn(B, H, W, cin)
    if nan_margin:  # the trunk's output read through strides; any read outside it is NaN
        big = torch.full((B, H + 1, W + 2, cin + 8), float("nan"))
        big[:, :H, :W, :cin] = x
        x = big.to(device, dtype)[:, :H, :W, :cin]   # the view made on the device
    ws = [torch.randn(cn, cin, 1, 1) / cin ** 0.5, 1 + 0.1 * torch.randn(cn), 0.1 * torch.randn(cn),
          torch.randn(cn, cn, 3, 3) / (9 * cn) ** 0.5, 1 + 0.1 * torch.randn(cn), 0.1 * torch.randn(cn),
          torch.randn(c2, cn, 3, 3) / (9 * cn) ** 0.5, torch.randn(c3, c2, 3, 3) / (9 * c2) ** 0.5]
    return [x.to(device, dtype)] + [w.to(device, dtype) for w in ws]


def check(args, dtype, msg=""):
    backend = fused_backend(args[0].device)
    with dk.backend(backend):
        out = dk.ops.compress(*args, eps=1e-6)
    assert dk.last_backends()["compress"].backend == backend
    want = ref.compress(*[a.float() for a in args], eps=1e-6)
    assert out.dtype == dtype and out.shape == want.shape
    assert_close(out, want, dtype, msg=msg)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device,B,side,channels", by_device([
    (1, 32, (48, 16, 32, 64)),    # Tiny (512 px): 32 -> 16 -> 8
    (2, 40, (48, 16, 32, 64)),    # Small and Gundam tiles (640 px): 40 -> 20 -> 10, batch 2
    (1, 64, (48, 16, 32, 64)),    # Base (1024 px): 64 -> 32 -> 16
    (1, 80, (48, 16, 32, 64)),    # Large (1280 px): 80 -> 40 -> 20
    (1, 48, (48, 16, 32, 56)),    # V2's 768 px tiles: 48 -> 24 -> 12 (net_3 to 7/8 of net_2 x 2, as 896 / 1024)
], [(B, side, FULL) for side in (32, 40, 64, 80) for B in (1, 8)] + [(B, side, FULL_V2) for side in (48, 64) for B in (1, 6)],
    ids=lambda c: f"B{c[0]}-{c[1]}-C{c[2][0]}-{c[2][3]}"))
def test_every_mode_grid(device, B, side, channels, dtype):
    check(make_args(B, side, side, *channels, dtype, nan_margin=True, device=device), dtype, f"B={B} side={side}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device,H,W", by_device([(7, 9), (5, 5), (1, 1), (2, 3)], [(7, 9), (5, 5), (1, 1), (2, 3)],
                                                 ids=lambda c: f"{c[0]}x{c[1]}"))
def test_odd_and_tiny_grids(device, H, W, dtype):
    """Odd sides: the stride-2 stencils' last row/column reads the bottom/right padding."""
    check(make_args(2, H, W, 24, 16, 16, 32, dtype, device=device), dtype, f"{H}x{W}")


def test_full_channel_counts_tiny_grid():
    """768 -> 256 -> 256 -> 512 -> 1024 as DeepEncoder has them, on Tiny's 32 x 32 grid, bf16 (on CUDA:
    every grid, every dtype, in test_every_mode_grid)."""
    check(make_args(1, 32, 32, *FULL, torch.bfloat16), torch.bfloat16, "full size")


def test_full_channel_counts_v2():
    """DeepEncoder V2's 768 -> 256 -> 256 -> 512 -> 896 on a 16 x 16 grid, bf16 (on CUDA: its 768 and
    1024 px grids, in test_every_mode_grid)."""
    check(make_args(1, 16, 16, *FULL_V2, torch.bfloat16), torch.bfloat16, "full size, V2")


EDGE_DEVICES = by_device([()], [()], ids=lambda c: "edge")   # edge cases: the same small shapes on both


@pytest.mark.parametrize("device", EDGE_DEVICES)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("H,W", [(4, 4), (5, 3)])
def test_stencil_borders_by_hand(device, stride, H, W):
    """Each output channel is one tap of the 3x3 stencil (weight = one-hot per tap), so the output
    says exactly which input pixel every tap read; outside the grid must read 0 (the padding)."""
    x = (torch.arange(H * W, dtype=torch.float32) + 1).view(1, H, W, 1)
    w = torch.zeros(9, 1, 3, 3)
    for tap in range(9):
        w[tap, 0, tap // 3, tap % 3] = 1.0
    out = conv_nhwc(x.to(device), kkio(w.to(device)), stride, 1, "net2_3x3_s2", interpret=device == "cpu").cpu()
    Ho, Wo = (H - 1) // stride + 1, (W - 1) // stride + 1
    assert out.shape == (1, Ho, Wo, 9)
    for oy in range(Ho):
        for ox in range(Wo):
            for tap in range(9):
                iy, ix = oy * stride - 1 + tap // 3, ox * stride - 1 + tap % 3
                expect = float(x[0, iy, ix, 0]) if 0 <= iy < H and 0 <= ix < W else 0.0
                assert float(out[0, oy, ox, tap]) == expect, (oy, ox, tap)


@pytest.mark.parametrize("device", EDGE_DEVICES)
def test_layer_norm_fused_by_hand(device):
    """The LN steps: biased variance over the channels, eps inside the root, affine after."""
    x = torch.tensor([[[[1.0, 2.0, 3.0, 6.0]]]], device=device)  # one pixel, 4 channels
    w = torch.eye(4, device=device).view(4, 4, 1, 1)             # 1x1 identity conv
    gamma, beta = torch.tensor([1.0, 2.0, 1.0, 1.0]), torch.tensor([0.0, 0.0, 1.0, 0.0])
    out = conv_nhwc(x, kkio(w), 1, 0, "neck_1x1_ln", (gamma.to(device), beta.to(device)), 1e-6, interpret=device == "cpu").cpu()
    mean, var = 3.0, (4 + 1 + 0 + 9) / 4
    want = torch.tensor([(v - mean) / (var + 1e-6) ** 0.5 for v in (1.0, 2.0, 3.0, 6.0)]) * gamma + beta
    torch.testing.assert_close(out.view(4), want)


def test_ln_config_must_hold_every_channel():
    with pytest.raises(ValueError, match="cannot fuse the LayerNorm"):
        conv_nhwc(torch.randn(1, 2, 2, 4), torch.randn(1, 1, 4, 300), 1, 0, "net2_3x3_s2",
                  (torch.ones(300), torch.zeros(300)), interpret=True)


@pytest.mark.parametrize("device", EDGE_DEVICES)
def test_drop_in_compressor_loads_checkpoint_names(device):
    """Compressor takes SamEncoder's neck/net_2/net_3 weights by name and matches the reference."""
    sam = SamEncoder(dim=48, depth=1, num_heads=1, global_blocks=(), neck_dim=16, out_dim=64)
    with torch.no_grad():
        for p in sam.parameters():
            p.normal_(0, 0.3)
    parts = {k: v for k, v in sam.state_dict().items() if k.split(".")[0] in ("neck", "net_2", "net_3")}
    comp = Compressor(dim=48, neck_dim=16, out_dim=64)
    assert set(comp.state_dict()) == set(parts)
    comp.load_state_dict(parts)
    comp.to(device), sam.to(device)
    x = torch.randn(2, 10, 10, 48).to(device)
    with torch.no_grad():
        with dk.backend(fused_backend(device)):
            fused = comp(x)
        with dk.backend("reference"):
            want = sam.compress(x)
    assert_close(fused, want, torch.float32)


def test_weight_cache_follows_tensors_not_addresses():
    """Two weight tensors sharing storage, address, shape and version counter but holding other
    values must not share the kernel's re-laid-out copy; an in-place update must refresh it."""
    base = torch.randn(2 * 16 * 4 * 3 * 3)
    a = base[: 16 * 4 * 9].view(16, 4, 3, 3)
    b = base.as_strided((16, 4, 3, 3), (72, 18, 6, 2))  # same data_ptr, other elements
    assert a.data_ptr() == b.data_ptr() and a._version == b._version
    assert torch.equal(kkio(a), a.permute(2, 3, 1, 0)) and torch.equal(kkio(b), b.permute(2, 3, 1, 0))
    a.mul_(2)
    assert torch.equal(kkio(a), a.permute(2, 3, 1, 0))
