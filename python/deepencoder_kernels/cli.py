"""``deepencoder-kernels`` command line: ``profile`` (the main job) and ``info``."""
from __future__ import annotations

import argparse
import sys

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _profile(args) -> int:
    from . import dispatch
    from .profiler import format_report, plot, profile, save_json

    with dispatch.backend(args.backend):
        p = profile(args.mode, args.image, args.weights, DTYPES[args.dtype], args.device, progress=not args.quiet,
                    repeat=args.repeat, warmup=args.warmup, batch=args.batch)
    print(format_report(p))
    if args.json:
        save_json(p, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        plot(p, args.plot)
        print(f"wrote {args.plot}")
    return 0


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
    p.add_argument("--mode", default="base", choices=["tiny", "small", "base", "large", "gundam"])
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
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(run=_profile)
    i = sub.add_parser("info", help="which backends can run here, and why not")
    i.set_defaults(run=_info)
    s = sub.add_parser("static-report", help="AOT-compile every kernel config (sm_80, sm_90a): regs, spills, smem, tensor cores",
                       add_help=False)
    s.set_defaults(run=None)
    r = sub.add_parser("regression", help="FLOPs, bytes allocated per op and CPU speed-ups vs a committed baseline",
                       add_help=False)
    r.set_defaults(run=None)
    args, rest = parser.parse_known_args(argv)
    if args.command == "static-report":
        from .static_report import main as static_main

        return static_main(rest)
    if args.command == "regression":
        from .regression import main as regression_main

        return regression_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
