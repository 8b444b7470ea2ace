"""Preprocessing equals DeepSeek's processors' PIL calls, written out, on a photographic-style image
(on flat synthetic pages resampling filters agree; on textured content they do not)."""
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageOps

import deepencoder_kernels as dk
from deepencoder_kernels import config as cfg
from deepencoder_kernels.preprocess import choose_tile_grid, to_pixels

GRAY = (127, 127, 127)


def photo(width=1301, height=977, seed=0) -> Image.Image:
    """Deterministic 'photograph': smooth lighting gradients, oriented textures of several
    frequencies (up to near Nyquist), hard-edged shapes and sensor-like noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for c in range(3):
        light = 90 + 60 * (x / width) + 40 * (y / height) * (c - 1)
        texture = sum(18 / (k + 1) * np.sin(2 * np.pi * (f * x + g * y) + c)
                      for k, (f, g) in enumerate([(0.013, 0.007), (0.11, 0.05), (0.31, -0.17), (0.45, 0.41)]))
        edges = 70 * ((((x // 37) + (y // 53)) % 2) - 0.5) * (c == 1)
        channels.append(light + texture + edges + rng.normal(0, 12, size=x.shape))
    img = Image.fromarray(np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)        # thin high-contrast strokes, like print and fine detail in a scan
    for _ in range(width * height // 4000):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        draw.line((x0, y0, x0 + int(rng.integers(-80, 80)), y0 + int(rng.integers(-80, 80))),
                  fill=tuple(int(v) for v in rng.integers(0, 256, 3)), width=int(rng.integers(1, 3)))
    return img


@pytest.fixture(scope="module")
def image():
    return photo()


@pytest.mark.parametrize("mode", ["tiny", "small"])
def test_tiny_small_are_upstreams_resize_then_pad(image, mode):
    S = cfg.MODES[mode].base_size
    want = to_pixels(ImageOps.pad(image.resize((S, S)), (S, S), color=GRAY))   # no filter argument, as upstream
    got = dk.preprocess(image, mode)
    assert got.tiles is None and torch.equal(got.global_view, want)
    # the test can tell filters apart: LANCZOS (the old rule) gives a visibly different view here
    lanczos = to_pixels(image.resize((S, S), Image.LANCZOS))
    assert (lanczos - got.global_view).abs().max() > 0.1


@pytest.mark.parametrize("mode", ["base", "large"])
def test_base_large_letterbox(image, mode):
    S = cfg.MODES[mode].base_size
    got = dk.preprocess(image, mode)
    assert torch.equal(got.global_view, to_pixels(ImageOps.pad(image, (S, S), color=GRAY)))


@pytest.mark.parametrize("size,max_crops,grid", [((1301, 977), 9, (3, 2)), ((1600, 200), 9, (8, 1)), ((1600, 200), 6, (6, 1))])
def test_gundam_global_view_and_tiles(size, max_crops, grid):
    image = photo(*size, seed=1)
    got = dk.preprocess(image, "gundam", max_crops=max_crops)
    assert got.grid == grid == choose_tile_grid(*size, max_crops=max_crops)
    assert torch.equal(got.global_view, to_pixels(ImageOps.pad(image, (1024, 1024), color=GRAY)))
    n_w, n_h = grid
    resized = image.resize((640 * n_w, 640 * n_h))
    tiles = [resized.crop((c * 640, r * 640, (c + 1) * 640, (r + 1) * 640)) for r in range(n_h) for c in range(n_w)]
    assert torch.equal(got.tiles, torch.stack([to_pixels(t) for t in tiles]))


def test_exif_rotated_jpeg_path_is_transposed(tmp_path):
    raw = Image.new("RGB", (96, 64), (255, 0, 0))
    raw.paste((0, 0, 255), (48, 0, 96, 64))                  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6                                         # orientation: rotate 90 CW to display
    path = tmp_path / "phone.jpg"
    raw.save(path, exif=exif, quality=95)
    decoded = Image.open(path).convert("RGB")
    assert decoded.size == (96, 64)
    upright = decoded.transpose(Image.Transpose.ROTATE_270)   # what orientation 6 means
    assert upright.size == (64, 96)
    from deepencoder_kernels.preprocess import load_image

    loaded = load_image(path)
    assert loaded.size == (64, 96) and np.array_equal(np.asarray(loaded), np.asarray(upright))
    for mode in ("tiny", "base"):
        from_path = dk.preprocess(path, mode).global_view
        assert torch.equal(from_path, dk.preprocess(upright, mode).global_view)
        assert not torch.equal(from_path, dk.preprocess(decoded, mode).global_view)   # sideways otherwise
    # a PIL image is taken as given (upstream's processors do not transpose what they are handed)
    assert load_image(Image.open(path)).size == (96, 64)


@pytest.mark.parametrize("model,mode", [("v1", m) for m in ("tiny", "small", "base", "large", "gundam")]
                         + [("v2", m) for m in ("base", "dynamic")])
def test_view_sizes_are_the_sizes_preprocess_resizes_to(model, mode, monkeypatch):
    """load_image decodes huge pages no smaller than view_sizes says: it must match the resizes
    preprocess applies to the page itself (not those of a view resized again, v2 base's 768 -> 1024)."""
    from deepencoder_kernels.preprocess import view_sizes

    sizes, page = [], []
    real_resize = Image.Image.resize

    def spy(self, size, *args, **kwargs):
        if self.size == page[0] and tuple(size) != self.size:      # a resize of the page (not a copy)
            sizes.append(tuple(size))
        return real_resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", spy)
    for size in [(300, 200), (641, 640), (769, 700), (1301, 977), (977, 1301), (1600, 200), (200, 3000), (1024, 1024),
                 (5000, 4999)]:
        sizes.clear()
        page[:] = [size]
        dk.preprocess(Image.new("L", size, 255), mode, model=model)
        assert sizes == [s for s in view_sizes(mode, *size, model=model) if s != size], size
