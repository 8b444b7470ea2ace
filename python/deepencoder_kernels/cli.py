"""``deepencoder-kernels`` command line: ``profile`` (the main job), ``encode`` and ``info``."""
from __future__ import annotations

import argparse
import sys

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _keep_freed_host_memory() -> bool:
    """Make glibc keep freed memory in this process (no mmap for large blocks, no trimming), so
    warm passes reuse it instead of faulting fresh pages in, as torch's caching allocator does on a
    GPU (measured: the warm Base pass on a 2-core CPU 11.2 s -> 9.1 s). Only for the ``profile``
    process; a no-op where the C library is not glibc."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4   # glibc's malloc.h
        # mallopt takes a C int: 2**31 - 1 is the largest trim threshold
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def _mode(args) -> str:
    """The mode asked for, checked against the model's modes (default: v1 base, v2 dynamic)."""
    from . import config as cfg

    mode = args.mode or ("dynamic" if args.model == "v2" else "base")
    cfg.mode_of(mode, args.model)   # a clear error naming the model's modes
    return mode


def _profile(args) -> int:
    from . import dispatch
    from .profiler import format_report, plot, profile, save_json

    if (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cpu":
        _keep_freed_host_memory()
    with dispatch.backend(args.backend):
        p = profile(args.mode, args.image, args.weights, DTYPES[args.dtype], args.device, progress=not args.quiet,
                    repeat=args.repeat, warmup=args.warmup, batch=args.batch, max_crops=args.max_crops, model=args.model)
    print(format_report(p))
    if args.json:
        save_json(p, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        plot(p, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _encode(args) -> int:
    try:
        if args.ray:   # the same steps as a Ray Data pipeline (deepencoder_kernels.ray); --out is a folder there
            from .ray import run_from_args

            return run_from_args(args)
        return _encode_here(args)
    except (FileNotFoundError, ImportError, ValueError) as e:   # found before any page is encoded
        print(f"deepencoder-kernels encode: error: {e}", file=sys.stderr)
        return 2


def _encode_here(args) -> int:
    from . import dispatch
    from .encode import encode_files
    from .profiler import choose_timing_dtype, random_encoder

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.dtype == "auto":   # bf16, unless this CPU only emulates it (measured): then fp32
        dtype = torch.bfloat16 if device.type != "cpu" else choose_timing_dtype(torch.bfloat16, device)[0]
    else:
        dtype = DTYPES[args.dtype]
    encoder = random_encoder(dtype=dtype, device=device, model=args.model)
    mode = args.mode or ("dynamic" if args.model == "v2" else "base")     # the defaults --mode's help names
    if args.weights:
        encoder.load_checkpoint(args.weights)
    else:
        print("warning: no --weights: seeded random weights (seed 0); the tokens are for testing only", file=sys.stderr)
    with dispatch.backend(args.backend):
        summary = encode_files(encoder, args.paths, args.out, mode, args.batch, args.max_crops,
                               progress=not args.quiet, recursive=args.recursive, password=args.password,
                               alpha=args.alpha, max_pixels=args.max_pixels)
    failed = summary["failed"]
    print(f"wrote {summary['out']}: {summary['encoded']}/{summary['pages']} pages, {summary['tokens']} tokens "
          f"({args.model} {mode}, {str(dtype).replace('torch.', '')}) in {summary['seconds']:.1f}s"
          + (f"; {len(failed)} page{'s' * (len(failed) > 1)} failed, listed in {summary['errors']}" if failed else ""))
    return 1 if failed else 0


def _info(args) -> int:
    from . import __version__, available

    print(f"deepencoder-kernels {__version__}, torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
    from .extension import EXTENSION, MISSING

    print(f"  C++ extension: {MISSING or f'built ({EXTENSION.build_info()})'}")
    for op, backends in available().items():
        for name, reasons in backends.items():
            print(f"  {op:<18} {name:<17} " + ("usable" if not reasons else "unusable: " + "; ".join(reasons)))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="deepencoder-kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("profile", help="measure FLOPs, activation memory and time per stage; check the claims")
    p.add_argument("--model", default="v1", choices=["v1", "v2"], help="encoder generation: v1 DeepEncoder, v2 DeepEncoder V2")
    p.add_argument("--mode", help="v1 (DeepSeek-OCR): tiny, small, base, large, gundam (default base); v2 (DeepSeek-OCR 2): dynamic, base (default dynamic)")
    p.add_argument("--image", help="image file (default: a document page the package renders)")
    p.add_argument("--weights", help="safetensors file or folder (default: seeded random weights)")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--backend", default="auto", choices=["auto", "reference", "triton", "triton-interpret", "cpp"])
    p.add_argument("--json", help="write the measurements as JSON here")
    p.add_argument("--plot", help="write a PNG of the per-stage breakdown here")
    p.add_argument("--repeat", type=int, default=1, help="timed warm passes (median, min..max); 0: count FLOPs and bytes only")
    p.add_argument("--warmup", type=int, default=1, help="untimed-in-the-table warm-up passes (compile/autotune; reported apart)")
    p.add_argument("--batch", type=int, default=1, help="copies of the page per pass (same-size views batched)")
    p.add_argument("--max-crops", type=int, help="tile budget (default: the mode's: v1 Gundam 9 as DeepSeek's HF code, its vLLM "
                   "config uses 6; v2 dynamic 6)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(run=_profile)
    e = sub.add_parser("encode", help="images / PDF pages -> vision tokens per page (safetensors), in packed batches",
                       description="Exit status: 0 every page written, 1 some page failed (reported on stderr and "
                       "in errors.jsonl beside --out; the others are written), 2 bad arguments.")
    e.add_argument("paths", nargs="+", metavar="PATH", help="image files, PDFs, folders and glob patterns "
                   "(PDF pages need the 'pdf' extra: pypdfium2; multi-page TIFF/GIF/WebP/APNG give a page per frame)")
    e.add_argument("--model", default="v1", choices=["v1", "v2"], help="encoder generation: v1 DeepEncoder, v2 DeepEncoder V2")
    e.add_argument("--mode", help="v1 (DeepSeek-OCR): tiny, small, base, large, gundam (default base); v2 (DeepSeek-OCR 2): dynamic, base (default dynamic)")
    e.add_argument("--out", required=True, help="output .safetensors: one [n_tokens, 1280] tensor per page id, + mode")
    e.add_argument("--weights", help="safetensors file or folder (default: seeded random weights, for testing)")
    e.add_argument("--batch", type=int, default=8, help="pages per packed pass (bounds memory)")
    e.add_argument("--max-crops", type=int, help="tile budget (default: the mode's: v1 Gundam 9 as DeepSeek's HF code, its vLLM "
                   "config uses 6; v2 dynamic 6)")
    e.add_argument("--dtype", default="auto", choices=["auto", *sorted(DTYPES)],
                   help="auto: bfloat16, or float32 on a CPU that only emulates bfloat16 (measured)")
    e.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    e.add_argument("--backend", default="auto", choices=["auto", "reference", "triton", "triton-interpret", "cpp"])
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.add_argument("--ray", action="store_true", help="run on Ray (a local one, or --ray-address / RAY_ADDRESS): CPU "
                   "preprocessing tasks, one encoder per GPU actor; --out is then a folder of token shards ('ray' extra)")
    from .encode import add_page_arguments
    from .ray import add_ray_arguments

    add_page_arguments(e)
    add_ray_arguments(e)
    e.set_defaults(run=_encode)
    i = sub.add_parser("info", help="which backends can run here, and why not")

    i.set_defaults(run=_info)
    s = sub.add_parser("static-report", help="AOT-compile every kernel config (sm_80, sm_90a): regs, spills, smem, tensor cores",
                       add_help=False)
    s.set_defaults(run=None)
    r = sub.add_parser("regression", help="FLOPs, bytes allocated per op and CPU speed-ups vs a committed baseline",
                       add_help=False)
    r.set_defaults(run=None)
    t = sub.add_parser("tune", help="check and time every candidate launch config per kernel and shape; winners per device",
                       add_help=False)
    t.set_defaults(run=None)
    args, rest = parser.parse_known_args(argv)
    if args.command == "tune":
        from .tune import main as tune_main

        return tune_main(rest)
    if args.command == "static-report":
        from .static_report import main as static_main

        return static_main(rest)
    if args.command == "regression":
        from .regression import main as regression_main

        return regression_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if hasattr(args, "model"):
        try:
            args.mode = _mode(args)
        except ValueError as e:
            parser.error(str(e))
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
