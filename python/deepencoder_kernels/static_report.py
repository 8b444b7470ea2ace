"""Static kernel report: AOT-compile every shipped Triton config at DeepEncoder's real shapes for
sm_80 and sm_90a (no GPU needed) and read registers, spills, shared memory and tensor-core
instructions off the cubin with the ``cuobjdump`` that ships inside the Triton wheel.

``deepencoder-kernels static-report --write F`` records a baseline; ``--check F`` fails (exit 1)
with a readable diff when a config stops compiling, spills, exceeds the GPU's shared memory,
loses its tensor-core instructions or needs more registers than the baseline.
Must run with TRITON_INTERPRET unset (the AOT compiler needs real JIT functions).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

from . import config as cfg

TARGETS = {"sm_80": 80, "sm_90a": 90}
SHARED_LIMIT = {"sm_80": 163 * 1024, "sm_90a": 227 * 1024}   # max dynamic shared memory per block
TENSOR_CORE_OPS = {"sm_80": ("HMMA",), "sm_90a": ("HMMA", "HGMMA")}
DTYPES = {"bf16": "bf16", "fp16": "fp16"}


@dataclass
class Row:
    kernel: str
    case: str            # e.g. "base/global"
    config: str          # the configs.py entry
    target: str
    dtype: str
    registers: int = 0
    spill_bytes: int = 0  # LOCAL + STACK
    shared_bytes: int = 0
    tensor_core_instructions: int = 0
    error: str = ""

    @property
    def key(self) -> str:
        return f"{self.kernel}|{self.case}|{self.target}|{self.dtype}"


def _tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} not found in the Triton wheel at {path}")
    return path


def cubin_figures(cubin: bytes, target: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "--dump-sass", f.name], capture_output=True, text=True, check=True).stdout
    grab = lambda key: int(m.group(1)) if (m := re.search(rf"\b{key}:(\d+)", usage)) else 0  # noqa: E731
    mnemonics = re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass)
    tc = sum(1 for m in mnemonics if m.split(".")[0] in TENSOR_CORE_OPS[target])
    return dict(registers=grab("REG"), spill_bytes=grab("LOCAL") + grab("STACK"), shared_bytes=grab("SHARED"),
                tensor_core_instructions=tc)


def compile_figures(fn, signature: dict, constexprs: dict, target: str, num_warps: int, num_stages: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # 16-byte divisibility of pointers and strides, as the JIT specialises them at run time
    attrs = {(i,): [["tt.divisibility", 16]] for i, (name, ty) in enumerate(signature.items())
             if ty.startswith("*") or name.startswith("stride")}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", TARGETS[target], 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    return cubin_figures(compiled.asm["cubin"], target)


# ---- the shipped kernels and their real-shape cases ------------------------------------------


def rel_pos_attention_cases():
    """(case, config name, config) for the windowed and global blocks of each mode's grid."""
    from deepencoder_kernels.kernels.configs import rel_pos_attention_config

    seen_modes = {"tiny": 512, "small": 640, "base": 1024, "large": 1280}
    for mode, size in seen_modes.items():
        g = cfg.sam_grid(size)
        for block, window in (("windowed", cfg.SAM_WINDOW), ("global", 0)):
            side = window or g
            name, conf = rel_pos_attention_config(window, side, side)
            yield f"{mode}/{block}", name, conf, window


def rel_pos_attention_rows(targets=TARGETS, dtypes=DTYPES):
    from deepencoder_kernels.kernels.rel_pos_attention import _rel_pos_attention_fwd_kernel as kernel

    cache: dict = {}
    for case, name, conf, window in rel_pos_attention_cases():
        conf = dict(conf)
        num_warps, num_stages = conf.pop("num_warps"), conf.pop("num_stages")
        for target in targets:
            for dtype in dtypes:
                row = Row("rel_pos_attention", case, name, target, dtype)
                p = "*" + dtype
                signature = {
                    "qkv_ptr": p, "pad_ptr": p, "table_h_ptr": p, "table_w_ptr": p, "out_ptr": p,
                    "stride_qb": "i32", "stride_qh": "i32", "stride_qw": "i32",
                    "stride_ob": "i32", "stride_oh": "i32", "stride_ow": "i32",
                    "H": "i32", "W": "i32", "SEQ_H": "i32", "SEQ_W": "i32",
                    "windows_w": "i32", "windows_per_image": "i32", "num_heads": "i32", "sm_scale": "fp32",
                }
                constexprs = dict(C=cfg.SAM_DIM, HEAD_DIM=cfg.HEAD_DIM, WINDOWED=window > 0, HAS_PAD=window > 0,
                                  IEEE_DOT=False, UPCAST_DOT=False, **conf)
                for c in constexprs:
                    signature[c] = "constexpr"
                key = (target, dtype, tuple(sorted(constexprs.items())), num_warps, num_stages)
                try:
                    if key not in cache:
                        cache[key] = compile_figures(kernel, signature, constexprs, target, num_warps, num_stages)
                    for k, v in cache[key].items():
                        setattr(row, k, v)
                except Exception as e:  # a config that stops compiling is a finding, not a crash
                    row.error = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                yield row


def build_report() -> list[Row]:
    from .dispatch import triton_interpret_mode

    if triton_interpret_mode():
        raise RuntimeError("the static report needs compiled kernels: unset TRITON_INTERPRET")
    return list(rel_pos_attention_rows())


def problems(rows: list[Row], baseline: dict | None) -> list[str]:
    """Every reason the report fails, readable."""
    out = []
    base = {r["key"]: r for r in (baseline or {}).get("rows", [])}
    for r in rows:
        where = f"{r.kernel} {r.case} ({r.config}) {r.target} {r.dtype}"
        if r.error:
            out.append(f"{where}: does not compile: {r.error}")
            continue
        if r.spill_bytes:
            out.append(f"{where}: spills {r.spill_bytes} bytes to local memory")
        if r.shared_bytes > SHARED_LIMIT[r.target]:
            out.append(f"{where}: needs {r.shared_bytes} B shared memory > {SHARED_LIMIT[r.target]} B on {r.target}")
        if r.tensor_core_instructions == 0:
            out.append(f"{where}: no tensor-core instructions ({'/'.join(TENSOR_CORE_OPS[r.target])}) in the SASS")
        b = base.get(r.key)
        if baseline is not None and b is None:
            out.append(f"{where}: not in the baseline (rerun with --write)")
        elif b is not None and r.registers > b["registers"]:
            out.append(f"{where}: registers grew {b['registers']} -> {r.registers}")
        elif b is not None and b["tensor_core_instructions"] and r.tensor_core_instructions < b["tensor_core_instructions"] // 2:
            out.append(f"{where}: tensor-core instructions fell {b['tensor_core_instructions']} -> {r.tensor_core_instructions}")
    return out


def to_json(rows: list[Row]) -> dict:
    import triton

    return {"triton": triton.__version__, "rows": [{**asdict(r), "key": r.key} for r in rows]}


def format_table(rows: list[Row]) -> str:
    lines = [f"{'kernel':<18}{'case':<16}{'config':<14}{'target':<8}{'dtype':<6}{'regs':>5}{'spill B':>8}{'smem B':>8}{'TC instr':>9}"]
    for r in rows:
        tail = f"  ERROR {r.error}" if r.error else ""
        lines.append(f"{r.kernel:<18}{r.case:<16}{r.config:<14}{r.target:<8}{r.dtype:<6}{r.registers:>5}"
                     f"{r.spill_bytes:>8}{r.shared_bytes:>8}{r.tensor_core_instructions:>9}{tail}")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="deepencoder-kernels static-report", description=__doc__)
    ap.add_argument("--write", help="write the report as the baseline JSON here")
    ap.add_argument("--check", help="compare against this baseline JSON; exit 1 on a regression")
    ap.add_argument("--json", help="also write this run's report here")
    args = ap.parse_args(argv)
    rows = build_report()
    print(format_table(rows))
    data = to_json(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)
    baseline = None
    if args.check:
        with open(args.check) as f:
            baseline = json.load(f)
    found = problems(rows, baseline)
    if args.write and not found:
        with open(args.write, "w") as f:
            json.dump(data, f, indent=1)
        print(f"wrote baseline {args.write}")
    if found:
        print("\nSTATIC REPORT FAILED:\n  " + "\n  ".join(found), file=sys.stderr)
        return 1
    print("static report: every config compiles, 0 spills, shared memory within limits, tensor cores in use")
    return 0


if __name__ == "__main__":
    sys.exit(main())
