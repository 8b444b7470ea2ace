"""Every launcher's grid stays inside CUDA's launch limits at serving-scale batches.

Computed from shapes alone (no launch): 1024 Gundam pages with HF's 9-crop budget are 9216 640 px
tiles + 1024 1024 px global views, the largest batch a vLLM or offline encode would hand over.
"""
import pytest

from deepencoder_kernels import config as cfg
from deepencoder_kernels.kernels._runtime import MAX_GRID, launch_grid
from deepencoder_kernels.kernels.compress import conv_grid, dgrad_grid, wgrad_grid
from deepencoder_kernels.kernels.configs import compress_bwd_config, compress_config, varlen_attention_config
from deepencoder_kernels.kernels.rel_pos_attention import launch_args
from deepencoder_kernels.kernels.varlen_attention import varlen_grid

PAGES = 1024
TILES_PER_PAGE = 9
VIEWS = {640: PAGES * TILES_PER_PAGE, 1024: PAGES}   # image size -> views in one call


def within_limits(grid):
    return all(n <= limit for n, limit in zip(grid, MAX_GRID))


def test_launch_grid_refuses_past_cuda_limits():
    assert launch_grid(2**31 - 1, 65535) == (2**31 - 1, 65535)
    with pytest.raises(ValueError, match="axis y"):
        launch_grid(1, 65536)
    with pytest.raises(ValueError, match="axis x"):
        launch_grid(2**31)


@pytest.mark.parametrize("size", sorted(VIEWS))
@pytest.mark.parametrize("window", [cfg.SAM_WINDOW, 0], ids=["windowed", "global"])
def test_rel_pos_attention_grid_at_serving_scale(size, window):
    g = cfg.sam_grid(size)
    geo = launch_args((VIEWS[size], g, g, 3 * cfg.SAM_DIM), cfg.SAM_HEADS, window)
    assert within_limits(geo["grid"])
    if window:  # the old (q tiles, sequences x heads) layout put 995,328 / 110,592 programs on y here
        assert geo["num_seqs"] * cfg.SAM_HEADS > MAX_GRID[1]


@pytest.mark.parametrize("case", ["clip", "sam-global"])
def test_varlen_attention_grid_at_serving_scale(case):
    seqs = sum(VIEWS.values())
    if case == "clip":
        heads, longest, conf = cfg.CLIP_HEADS, cfg.compressed_grid(1024) ** 2 + 1, varlen_attention_config(False, 1, 1)
    else:
        g = cfg.sam_grid(1024)
        heads, longest, conf = cfg.SAM_HEADS, g * g, varlen_attention_config(True, g, g)
    _, grid = varlen_grid(seqs, heads, longest, conf)
    assert within_limits(grid)
    assert seqs * heads > MAX_GRID[1]


@pytest.mark.parametrize("step,c_out", [("neck_1x1_ln", cfg.SAM_NECK_DIM), ("net3_3x3_s2", cfg.SAM_OUT_DIM)])
def test_compress_grid_at_serving_scale(step, c_out):
    pixels = sum(n * cfg.sam_grid(size) ** 2 for size, n in VIEWS.items())
    assert within_limits(conv_grid(pixels, c_out, compress_config(step, c_out)))


@pytest.mark.parametrize("step,ksize,stride,c_in,c_out", [
    ("neck_1x1", 1, 1, cfg.SAM_DIM, cfg.SAM_NECK_DIM), ("neck_3x3", 3, 1, cfg.SAM_NECK_DIM, cfg.SAM_NECK_DIM),
    ("net2", 3, 2, cfg.SAM_NECK_DIM, cfg.SAM_OUT_DIM // 2), ("net3", 3, 2, cfg.SAM_OUT_DIM // 2, cfg.SAM_OUT_DIM)])
def test_compress_backward_grids_at_serving_scale(step, ksize, stride, c_in, c_out):
    """The backward's input-gradient (parity classes x pixel tiles on x) and weight-gradient (1-D)
    launches, training on the same batch."""
    shapes = [(n, cfg.sam_grid(size)) for size, n in VIEWS.items()]
    pixels_in = sum(n * g * g for n, g in shapes)
    pixels_out = sum(n * ((g + stride - 1) // stride) ** 2 for n, g in shapes)
    dgrad = f"{step}_dgrad_ln" if step in ("neck_3x3", "net2") else f"{step}_dgrad"
    # one batch of the larger view size alone bounds the largest parity class
    grid = dgrad_grid(sum(n for n, _ in shapes), cfg.sam_grid(1024), cfg.sam_grid(1024), stride, c_in,
                      compress_bwd_config(dgrad, c_in))
    assert within_limits(grid) and grid[0] * compress_bwd_config(dgrad, c_in)["BLOCK_M"] >= pixels_in
    grid, splits, _ = wgrad_grid(pixels_out, ksize, c_in, c_out, compress_bwd_config(f"{step}_wgrad", c_out))
    assert within_limits(grid) and splits >= 1


@pytest.mark.parametrize("size", sorted(VIEWS))
@pytest.mark.parametrize("window", [cfg.SAM_WINDOW, 0], ids=["windowed", "global"])
def test_rel_pos_attention_backward_grids_at_serving_scale(size, window):
    from deepencoder_kernels.kernels.rel_pos_attention_backward import launch_args as bwd_launch_args

    g = cfg.sam_grid(size)
    geo = bwd_launch_args((VIEWS[size], g, g, 3 * cfg.SAM_DIM), cfg.SAM_HEADS, window)
    assert within_limits(geo["dq_grid"]) and within_limits(geo["dkv_grid"])


@pytest.mark.parametrize("case", ["clip", "sam-global"])
def test_varlen_attention_backward_grids_at_serving_scale(case):
    from deepencoder_kernels.kernels.configs import varlen_attention_bwd_config
    from deepencoder_kernels.kernels.varlen_attention_backward import varlen_bwd_grids

    seqs = sum(VIEWS.values())
    if case == "clip":
        heads, longest, confs = cfg.CLIP_HEADS, cfg.compressed_grid(1024) ** 2 + 1, varlen_attention_bwd_config(False, 1, 1)
    else:
        g = cfg.sam_grid(1024)
        heads, longest, confs = cfg.SAM_HEADS, g * g, varlen_attention_bwd_config(True, g, g)
    _, _, dq_grid, dkv_grid = varlen_bwd_grids(seqs, heads, longest, *confs)
    assert within_limits(dq_grid) and within_limits(dkv_grid)
