"""Time and peak memory of reading one page into a mode's views: a normal page, a huge scan and a
100-inch PDF page, upstream's way (every pixel decoded or rendered at 144 dpi, then PIL's resizes)
vs this package's (``preprocess(path, mode)``: the page decoded at the size its views need), with
the difference between the two sets of views in levels of 0..255.

Pages (generated, synthetic text): an A4 page scanned at 300 dpi (2480 x 3508 JPEG), a US Letter
PDF page, the 14000 x 13000 scan from issue 22 as a JPEG and as a PNG (PNG has no reduced decode:
it is read whole, then reduced), and a 100 x 100 inch PDF page (14400 px a side at 144 dpi).

Each (page, mode, way) runs in a fresh Python process: time is the median of ``--repeat`` warm
reads after one untimed read; peak memory is the process's resident high-water mark minus its
resident size before the first read (Linux ``ru_maxrss`` and ``/proc/self/statm``), so it holds
the decoded page, the views and whatever the decoder allocates, not the interpreter and torch.

    cd benchmarks && python bench_pages.py         # writes results/pages_<device>.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))      # the tests' synthetic page generators
MODES = ("tiny", "base", "gundam")


def make_pages(folder: Path) -> dict[str, Path]:
    from synthetic_pages import make_pdf, text_page, text_pdf

    pages = {"A4 scan, 300 dpi (JPEG)": folder / "a4_300dpi.jpg", "US Letter PDF page": folder / "letter.pdf",
             "14000 x 13000 scan (JPEG)": folder / "scan_14000x13000.jpg",
             "14000 x 13000 scan (PNG)": folder / "scan_14000x13000.png",
             "100 x 100 inch PDF page": folder / "poster_100in.pdf"}
    if not pages["A4 scan, 300 dpi (JPEG)"].exists():
        text_page(2480, 3508, seed=1).convert("RGB").save(pages["A4 scan, 300 dpi (JPEG)"], quality=90)
        pages["US Letter PDF page"].write_bytes(text_pdf(1))
        big = text_page(14000, 13000, seed=2)
        big.save(pages["14000 x 13000 scan (JPEG)"], quality=90)
        big.save(pages["14000 x 13000 scan (PNG)"], compress_level=1)
        del big
        lines = [f"line {i}: a hundred-inch page of text in 120 pt Helvetica" for i in range(40)]
        pages["100 x 100 inch PDF page"].write_bytes(make_pdf([(7200, 7200, lines)]))
    return pages


def upstream_image(path: Path):
    """Every pixel: PIL's full decode (DeepSeek's load_image: exif_transpose, convert RGB), a PDF at 144 dpi."""
    from PIL import Image, ImageOps

    Image.MAX_IMAGE_PIXELS = None          # upstream would refuse the huge scan outright (DecompressionBombError)
    if path.suffix == ".pdf":
        import pypdfium2

        doc = pypdfium2.PdfDocument(str(path))
        try:
            return doc[0].render(scale=144 / 72).to_pil().convert("RGB")
        finally:
            doc.close()
    with Image.open(path) as im:
        return ImageOps.exif_transpose(im).convert("RGB")


def read_views(path: Path, mode: str, way: str):
    import deepencoder_kernels as dk

    if way == "upstream":
        return dk.preprocess(upstream_image(path), mode)        # a PIL image: as given, PIL's resizes
    return dk.preprocess(path, mode, max_pixels=None)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def one(path: Path, mode: str, way: str, repeat: int) -> dict:
    """In this (fresh) process: time and peak memory of one page, or the views' difference."""
    import pypdfium2  # noqa: F401  (imported before the baseline: only the page's memory is counted)
    import torch
    from PIL import Image

    import deepencoder_kernels  # noqa: F401

    Image.init()
    torch.set_num_threads(1)
    if way == "diff":
        a, b = read_views(path, mode, "upstream"), read_views(path, mode, "this package")
        d = [((x - y).abs() * 127.5).round() for x, y in ((a.global_view, b.global_view), (a.tiles, b.tiles)) if x is not None]
        return {"max_levels": max(float(t.max()) for t in d), "mean_levels": sum(float(t.sum()) for t in d) / sum(t.numel() for t in d),
                "equal": all(float(t.max()) == 0 for t in d)}
    before = _rss()
    times = []
    for i in range(repeat + 1):
        start = time.perf_counter()
        views = read_views(path, mode, way)
        elapsed = time.perf_counter() - start
        del views
        if i:
            times.append(elapsed)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"seconds": statistics.median(times), "seconds_min": min(times), "seconds_max": max(times), "peak_mib": peak / 2**20}


def run_child(path: Path, mode: str, way: str, repeat: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--one", str(path), mode, way, "--repeat", str(repeat)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="timed warm reads per case (median)")
    parser.add_argument("--pages", help="folder for the generated pages (default: a temporary folder)")
    parser.add_argument("--one", nargs=3, metavar=("PATH", "MODE", "WAY"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one(Path(args.one[0]), args.one[1], args.one[2], args.repeat)))
        return
    from common import write_result

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.pages or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        pages = make_pages(folder)
        rows = []
        for label, path in pages.items():
            for mode in MODES:
                row = {"page": label, "file": path.name, "mode": mode}
                for way in ("upstream", "this package"):
                    row[way] = run_child(path, mode, way, args.repeat)
                row["views_vs_upstream"] = run_child(path, mode, "diff", 0)
                rows.append(row)
                u, p, d = row["upstream"], row["this package"], row["views_vs_upstream"]
                print(f"{label:<27} {mode:<7} upstream {u['seconds']:7.3f} s {u['peak_mib']:7.0f} MiB | this package "
                      f"{p['seconds']:7.3f} s {p['peak_mib']:7.0f} MiB | views: "
                      + ("equal" if d["equal"] else f"max {d['max_levels']:.0f}, mean {d['mean_levels']:.3f} levels"), flush=True)
    print(f"wrote {write_result('pages_cpu', rows)}")


if __name__ == "__main__":
    main()
