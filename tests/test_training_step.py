"""A SAM + compressor training step at full width on the fused backends (issue 13's proof).

Full channel counts (768-wide trunk, 12 heads of 64, neck 256, compressor 512 -> 1024) with one
windowed and one global block on a 160 px view: a 10 x 10 grid, so the window is padded (10 -> 14,
padded keys take the qkv bias and pass their gradient to it), the global block's 127-row tables are
resized to 19 rows (their interpolation is differentiated as upstream's autograd does), and the
compressor's stride-2 convs take odd sides (10 -> 5 -> 3). Every parameter's gradient through the
fused forward + backward kernels (Triton's interpreter) equals autograd through the reference.
"""
import copy

import pytest
import torch

import deepencoder_kernels as dk
from deepencoder_kernels.config import TOLERANCES
from deepencoder_kernels.modules import SamEncoder
from conftest import assert_close


def train_step(model, pixels, target):
    terms = model(pixels.to(model.pos_embed.dtype)).float() * target
    loss = terms.sum()
    loss.backward()
    # the loss and its cancellation-free size (sum of |terms|): errors are measured against the latter
    return (loss.detach(), terms.detach().abs().sum()), {name: p.grad.float() for name, p in model.named_parameters()}


def within_flash_rule(name, fused, same_dtype, truth, scale, atol):
    """FlashAttention's rule: the fused path's error against the fp32 truth (worst element, over
    ``scale``) is at most twice that of the same-dtype reference, plus a quarter of the dtype's atol
    for near-exact cases."""
    err_fused = (fused - truth).abs().max().item() / scale
    err_same_dtype = (same_dtype - truth).abs().max().item() / scale
    assert err_fused <= 2 * err_same_dtype + atol / 4, f"{name}: {err_fused:.3g} vs same-dtype reference {err_same_dtype:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sam_and_compressor_train_on_the_fused_backends(dtype):
    torch.manual_seed(0)
    sam = SamEncoder(depth=2, global_blocks=(1,))
    with torch.no_grad():
        for name, p in sam.named_parameters():
            p.normal_(0, 0.3 if ("rel_pos" in name or "bias" in name or "pos_embed" in name) else 0.02)
            if name.endswith(("norm1.weight", "norm2.weight", "neck.1.weight", "neck.3.weight")):
                p.add_(1.0)
    pixels = torch.rand(1, 3, 160, 160) * 2 - 1
    target = torch.randn(1, 1024, 3, 3)

    with dk.backend("reference"):
        (want_loss, loss_size), truth = train_step(copy.deepcopy(sam), pixels, target)   # fp32 autograd: the truth
        same_loss, same_dtype = (train_step(copy.deepcopy(sam).to(dtype), pixels, target)
                                 if dtype != torch.float32 else ((None, None), None))
    dk.clear_last_backends()
    with dk.backend("triton-interpret"):
        (got_loss, _), got = train_step(copy.deepcopy(sam).to(dtype), pixels, target)
    used = {op: c.backend for op, c in dk.last_backends().items()}
    assert used == {"rel_pos_attention": "triton-interpret", "compress": "triton-interpret"}, used
    atol, _ = TOLERANCES[dtype]
    if dtype == torch.float32:
        assert_close(got_loss, want_loss, dtype, msg="loss")
    else:
        # the loss sums 9216 signed terms: in bf16 its error is that of the terms (~1e-2 of their size),
        # not of the sum; the same FlashAttention rule as the gradients, against the sum of |terms|
        within_flash_rule("loss", got_loss, same_loss[0], want_loss, loss_size.item(), atol)
    for name, want in truth.items():
        scale = max(1e-6, want.abs().max().item())   # errors relative to each gradient's size
        if dtype == torch.float32:
            assert_close(got[name] / scale, want / scale, dtype, msg=name)
        else:
            within_flash_rule(name, got[name], same_dtype[name], want, scale, atol)
