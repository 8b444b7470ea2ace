"""Backward of the fused neck + compressor (Triton interpreter on CPU) against autograd through the
reference chain: gradients of x and of all eight parameters."""
import importlib

import pytest
import torch

import deepencoder_kernels as dk
from deepencoder_kernels import reference as ref
from deepencoder_kernels.kernels.compress import conv_dgrad, conv_wgrad, wgrad_splits
from deepencoder_kernels.kernels.configs import compress_bwd_config
from deepencoder_kernels.ops.compress import kernel_weights, kkio
from conftest import assert_close, by_device, fused_backend
from test_compress_kernel import make_args

compress_ops = importlib.import_module("deepencoder_kernels.ops.compress")  # the module (ops.compress is the function)
NAMES = ("x", "neck0_w", "neck1_w", "neck1_b", "neck2_w", "neck3_w", "neck3_b", "net2_w", "net3_w")


def fused_grads(args, grad_out):
    leaves = [a.detach().requires_grad_() for a in args]
    backend = fused_backend(args[0].device)
    with dk.backend(backend):
        out = dk.ops.compress(*leaves, eps=1e-6)
    assert dk.last_backends()["compress"].backend == backend   # the fused path, under autograd
    return out, torch.autograd.grad(out, leaves, grad_out)


def check_grads(args, dtype, msg=""):
    """bf16/fp16 gradients against fp32 autograd on the same (rounded) inputs. Each gradient is scaled
    by its largest reference element first: a weight gradient sums thousands of products, so the
    dtype's tolerance applies relative to the tensor's magnitude, not to each element's."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        shape = ref.compress(*[a.float() for a in args], eps=1e-6).shape
    grad_out = torch.randn(shape, generator=g).to(args[0].device, dtype)
    out, grads = fused_grads(args, grad_out)
    leaves = [a.detach().float().requires_grad_() for a in args]
    want_out = ref.compress(*leaves, eps=1e-6)
    want = torch.autograd.grad(want_out, leaves, grad_out.float())
    assert_close(out, want_out, dtype, msg=f"{msg} forward")
    for name, got, exp, a in zip(NAMES, grads, want, args):
        assert got.dtype == dtype and got.shape == a.shape, (name, got.dtype, got.shape)
        scale = exp.abs().max().clamp_min(1e-12)
        assert_close(got.float() / scale, exp / scale, dtype, msg=f"{msg} d{name}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("device,B,side", by_device(
    [(1, 9)],                                                    # the CPU edges are covered below
    [(B, side) for side in (32, 40, 64, 80) for B in (1, 8)]))   # every mode's grid, batch 1 and 8
def test_full_channels_at_real_shapes(device, B, side, dtype):
    """CUDA: DeepEncoder's channels (768 -> 256 -> 256 -> 512 -> 1024) on every mode's grid, x read
    through strides with NaN around it; CPU: one small case through the same body."""
    channels = (768, 256, 512, 1024) if device == "cuda" else (24, 16, 16, 32)
    check_grads(make_args(B, side, side, *channels, dtype, nan_margin=True, device=device), dtype, f"B={B} side={side}")


@pytest.mark.parametrize("B,side,dtype", [
    (1, 32, torch.bfloat16),   # Tiny (512 px): 32 -> 16 -> 8
    (2, 40, torch.bfloat16),   # Small and Gundam tiles (640 px), batch 2
    (1, 64, torch.float32),    # Base (1024 px): 64 -> 32 -> 16
    (1, 80, torch.float32),    # Large (1280 px): 80 -> 40 -> 20
])
def test_every_mode_grid_reduced_channels(B, side, dtype):
    """x read through strides (NaN around it: any read outside the view shows)."""
    check_grads(make_args(B, side, side, 48, 16, 32, 64, dtype, nan_margin=True), dtype, f"B={B} side={side}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,H,W", [(2, 7, 9), (1, 5, 5), (2, 1, 1), (1, 2, 3), (1, 6, 11)])
def test_odd_and_tiny_grids(B, H, W, dtype):
    """Odd sides: the stride-2 input gradients' last row / column (only some taps land there); 1 x 1:
    every tap but the centre reads padding; parity classes that hold no pixel."""
    check_grads(make_args(B, H, W, 24, 16, 16, 32, dtype, nan_margin=True), dtype, f"{H}x{W}")


def test_fp16():
    check_grads(make_args(2, 7, 6, 24, 16, 16, 32, torch.float16), torch.float16)


def test_full_channel_counts_small_grid():
    """768 -> 256 -> 256 -> 512 -> 1024 as DeepEncoder has them (every channel loop, the LN tiles at
    256), bf16, on a 6 x 5 grid."""
    check_grads(make_args(1, 6, 5, 768, 256, 512, 1024, torch.bfloat16), torch.bfloat16, "full size")


def test_bitwise_deterministic():
    """Same inputs, same gradients, bit for bit: split-K and LayerNorm partials are summed in a fixed
    order, never with atomics. The grid has several weight-gradient splits, the last one partial."""
    args = make_args(2, 20, 20, 24, 16, 16, 32, torch.bfloat16)
    splits, per_split = wgrad_splits(2 * 20 * 20, 1, compress_bwd_config("neck_1x1_wgrad", 16))
    assert splits > 1 and splits * per_split > 2 * 20 * 20
    grad_out = torch.randn(2, 25, 32).to(torch.bfloat16)
    first = fused_grads(args, grad_out)[1]
    second = fused_grads(args, grad_out)[1]
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name


def test_weight_gradient_splits_by_shape():
    """Split counts follow from shapes (never data): at least MIN_PIXELS pixels a split, at most
    MAX_SPLITS, about PROGRAMS programs in all, every pixel in exactly one split."""
    cfg = compress_bwd_config("neck_3x3_wgrad", 256)
    for pixels, tiles in [(1, 36), (4096, 36), (4096 * 32, 36), (1600, 9 * 4 * 8), (10**7, 9)]:
        splits, per = wgrad_splits(pixels, tiles, cfg)
        assert per % cfg["BLOCK_K"] == 0 and (splits - 1) * per < pixels <= splits * per
        assert splits == 1 or per >= cfg["MIN_PIXELS"]
        assert splits <= cfg["MAX_SPLITS"]
        assert splits * tiles <= max(cfg["PROGRAMS"], tiles) + tiles


@pytest.mark.parametrize("stride", [1, 2])
def test_input_gradient_stencil_by_hand(stride):
    """dx of a one-channel 3x3 conv whose weight is one-hot per output channel (tap t -> channel t):
    dx at each input pixel sums dy over exactly the (output pixel, tap) pairs that read it."""
    H, W = 5, 4
    w = torch.zeros(9, 1, 3, 3)
    for tap in range(9):
        w[tap, 0, tap // 3, tap % 3] = 1.0
    Ho, Wo = (H - 1) // stride + 1, (W - 1) // stride + 1
    dy = torch.randn(1, Ho, Wo, 9)
    dx = conv_dgrad(dy, kkio(w), (H, W), stride, 1, "net3_dgrad", interpret=True)
    want = torch.zeros(1, H, W, 1)
    for oy in range(Ho):
        for ox in range(Wo):
            for tap in range(9):
                iy, ix = oy * stride - 1 + tap // 3, ox * stride - 1 + tap % 3
                if 0 <= iy < H and 0 <= ix < W:
                    want[0, iy, ix, 0] += dy[0, oy, ox, tap]
    torch.testing.assert_close(dx, want)


def test_weight_gradient_by_hand():
    """dW[tap, ci, co] of a stride-2 conv = sum over output pixels of x(read by tap) * dy; padding reads 0."""
    x = torch.randn(2, 5, 3, 3)
    dy = torch.randn(2, 3, 2, 4)
    dw = conv_wgrad(x, dy, 3, 2, 1, "net2_wgrad", interpret=True).permute(2, 3, 1, 0)   # -> [k, k, C_in, C_out]
    want = torch.zeros(3, 3, 3, 4)
    for b in range(2):
        for oy in range(3):
            for ox in range(2):
                for ky in range(3):
                    for kx in range(3):
                        iy, ix = oy * 2 - 1 + ky, ox * 2 - 1 + kx
                        if 0 <= iy < 5 and 0 <= ix < 3:
                            want[ky, kx] += x[b, iy, ix][:, None] * dy[b, oy, ox][None, :]
    torch.testing.assert_close(dw, want)


def test_ln_backward_config_must_hold_every_channel():
    with pytest.raises(ValueError, match="cannot fuse the LayerNorm backward"):
        conv_dgrad(torch.randn(1, 2, 2, 4), torch.randn(1, 1, 300, 4), (2, 2), 1, 0, "net3_dgrad",
                   (torch.randn(1, 2, 2, 300), torch.randn(4, 2), torch.ones(300)), interpret=True)


def test_training_step_compiles_fullgraph():
    """torch.compile(fullgraph=True) traces forward + backward (the training forward and the backward
    are custom ops with fakes); the gradients equal eager's."""
    args = [a.requires_grad_() for a in make_args(1, 7, 5, 24, 16, 16, 32, torch.float32)]

    def step(*a):
        return (dk.ops.compress(*a, eps=1e-6) ** 2).sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    with dk.backend("triton-interpret"):
        compiled(*args).backward()
    got = [a.grad for a in args]
    leaves = [a.detach().requires_grad_() for a in args]
    want = torch.autograd.grad(step(*leaves), leaves)
    for name, a, b in zip(NAMES, got, want):
        assert_close(a, b, torch.float32, msg=name)


def test_saved_state_is_less_than_the_reference_keeps():
    """What the fused forward keeps for backward (beyond its inputs): c1, c2, y3 and 8 bytes of fp32
    statistics a pixel per norm, against everything autograd keeps through the reference."""
    x, *w = make_args(1, 16, 16, 48, 16, 32, 64, torch.float32)
    saved = compress_ops._compress_train_op(x, *w, 1e-6, "triton-interpret")[1:]
    fused_bytes = sum(t.numel() * t.element_size() for t in saved)
    B, H, W, cn, c2 = 1, 16, 16, 16, 32
    assert fused_bytes == 2 * B * H * W * cn * 4 + 2 * B * H * W * 8 + B * (H // 2) * (W // 2) * c2 * 4

    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    leaves = [a.requires_grad_() for a in (x, *w)]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ref.compress(*leaves, eps=1e-6)
    inputs = {a.untyped_storage().data_ptr() for a in leaves}
    reference_bytes = sum(n for p, n in kept.items() if p not in inputs)
    assert fused_bytes < reference_bytes


def test_compressor_module_trains_on_the_fused_path():
    """The drop-in Compressor (what accelerate() routes SAM encoders' neck + compressor through): an
    optimiser step's parameter gradients on the fused backend equal the reference backend's."""
    from deepencoder_kernels.modules import Compressor

    comp = Compressor(dim=24, neck_dim=16, out_dim=32)
    with torch.no_grad():
        for p in comp.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 6, 7, 24)
    grads = {}
    for backend in ("triton-interpret", "reference"):
        comp.zero_grad()
        with dk.backend(backend):
            comp(x).square().mean().backward()
        assert dk.last_backends()["compress"].backend == backend
        grads[backend] = {n: p.grad.clone() for n, p in comp.named_parameters()}
    assert set(grads["reference"]) == {n for n, _ in comp.named_parameters()}
    for name, want in grads["reference"].items():
        assert_close(grads["triton-interpret"][name], want, torch.float32, msg=name)


def test_stubbed_launch_memory_equals_an_interpreted_run():
    """bench_compress measures the training step's memory at full size with the Triton launches
    stubbed: the same launchers run for real here (small shapes) allocate exactly the same."""
    import contextlib

    from deepencoder_kernels.kernels import compress as kernels
    from deepencoder_kernels.profiler import MemoryTracker, stubbed_launches

    x, *w = make_args(1, 9, 10, 24, 16, 16, 32, torch.float32)
    kw = kernel_weights(*w)
    figures = []
    for stub in (False, True):
        with (stubbed_launches(kernels) if stub else contextlib.nullcontext()), MemoryTracker() as memory:
            tokens, *saved = kernels.compress_fwd(x, *kw, 1e-6, interpret=True, train=True)
            grads = kernels.compress_bwd(torch.ones_like(tokens), x, *kw, *saved, interpret=True)
            del tokens, saved, grads
        figures.append((memory.peak, memory.total))
    assert figures[0] == figures[1]
