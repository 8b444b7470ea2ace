"""Static kernel report: AOT-compile every shipped Triton config at DeepEncoder's real shapes for
sm_80 and sm_90a (no GPU needed) and read registers, spills, shared memory and tensor-core
instructions off the cubin with the ``cuobjdump`` that ships inside the Triton wheel.

``deepencoder-kernels static-report --write F`` records a baseline; ``--check F`` fails (exit 1)
with a readable diff when a config stops compiling, spills, exceeds the GPU's shared memory,
loses its tensor-core instructions or needs more registers than the baseline.
Must run with TRITON_INTERPRET unset (the AOT compiler needs real JIT functions).
"""
from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

from . import config as cfg

TARGETS = {"sm_80": 80, "sm_90a": 90}
MODE_SIZES = {"tiny": 512, "small": 640, "base": 1024, "large": 1280}
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
    shared_bytes: int = 0  # static (cubin) + dynamic (Triton's launch request)
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
    mnemonics = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass)
    tc = sum(1 for m in mnemonics if m.split(".")[0] in TENSOR_CORE_OPS[target])
    return dict(registers=grab("REG"), spill_bytes=grab("LOCAL") + grab("STACK"), shared_bytes=grab("SHARED"),
                tensor_core_instructions=tc)


def compile_figures(fn, signature: dict, constexprs: dict, target: str, num_warps: int, num_stages: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # 16-byte divisibility of pointers and strides, as the JIT specialises them at run time
    for p in fn.params:   # constexprs left out keep the kernel's defaults (the compiler needs every one)
        if p.is_constexpr and p.has_default and p.name not in constexprs:
            constexprs, signature = {**constexprs, p.name: p.default}, {**signature, p.name: "constexpr"}
    attrs = {(i,): [["tt.divisibility", 16]] for i, (name, ty) in enumerate(signature.items())
             if ty.startswith("*") or name.startswith("stride")}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", TARGETS[target], 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    figures = cubin_figures(compiled.asm["cubin"], target)
    # the cubin declares static shared memory only; Triton's pipelines use dynamic shared memory,
    # which it requests at launch (metadata.shared): the launch needs both
    figures["shared_bytes"] += compiled.metadata.shared
    return figures


# ---- the shipped kernels and their real-shape cases ------------------------------------------


def rel_pos_attention_cases():
    """(case, config name, constexprs, num_warps, num_stages) for the windowed and global blocks of each mode's grid."""
    from deepencoder_kernels.kernels.configs import rel_pos_attention_config

    for mode, size in MODE_SIZES.items():
        g = cfg.sam_grid(size)
        for block, window in (("windowed", cfg.SAM_WINDOW), ("global", 0)):
            side = window or g
            name, conf = rel_pos_attention_config(window, side, side)
            conf = dict(conf)
            launch = conf.pop("num_warps"), conf.pop("num_stages")
            constexprs = dict(C=cfg.SAM_DIM, HEAD_DIM=cfg.HEAD_DIM, WINDOWED=window > 0, HAS_PAD=window > 0,
                              IEEE_DOT=False, UPCAST_DOT=False, **conf, STORE_LSE=False)
            yield f"{mode}/{block}", name, constexprs, *launch


def rel_pos_attention_bwd_cases(kernel: str):
    """The backward's ``dq`` or ``dkv`` kernel for the windowed and global blocks of each mode's grid."""
    from deepencoder_kernels.kernels.configs import rel_pos_attention_bwd_config

    for mode, size in MODE_SIZES.items():
        g = cfg.sam_grid(size)
        for block, window in (("windowed", cfg.SAM_WINDOW), ("global", 0)):
            side = window or g
            name, dq, dkv = rel_pos_attention_bwd_config(window, side, side)
            conf = dict(dq if kernel == "dq" else dkv)
            launch = conf.pop("num_warps"), conf.pop("num_stages")
            constexprs = dict(C=cfg.SAM_DIM, HEAD_DIM=cfg.HEAD_DIM, WINDOWED=window > 0, HAS_PAD=window > 0,
                              IEEE_DOT=False, UPCAST_DOT=False, **conf)
            yield f"{mode}/{block}", f"{name}/{kernel}", constexprs, *launch


def rel_pos_attention_bwd_signature(kernel: str, dtype: str) -> dict:
    p = "*" + dtype
    names = (("qkv_ptr", p), ("table_h_ptr", p), ("table_w_ptr", p)) + ((("out_ptr", p),) if kernel == "dq" else ()) + (
        ("dout_ptr", p), ("lse_ptr", "*fp32"), ("delta_ptr", "*fp32"), ("dqkv_ptr", p))
    names += (("dtable_h_ptr", "*fp32"), ("dtable_w_ptr", "*fp32")) if kernel == "dq" else (("dpad_ptr", "*fp32"),)
    sig = dict(names + (("pad_ptr", p),))
    sig.update({name: "i32" for name in ("stride_qb", "stride_qh", "stride_qw", "stride_ob", "stride_oh", "stride_ow",
                                         "stride_gb", "stride_gh", "stride_gw", "H", "W", "SEQ_H", "SEQ_W", "windows_w",
                                         "windows_per_image", "num_heads", "num_m_tiles" if kernel == "dq" else "num_n_tiles")})
    if kernel == "dq":
        sig["program_offset"] = "i32"
    sig["sm_scale"] = "fp32"
    return sig


def rel_pos_attention_signature(dtype: str) -> dict:
    p = "*" + dtype
    sig = {name: p for name in ("qkv_ptr", "pad_ptr", "table_h_ptr", "table_w_ptr", "out_ptr")}
    sig["lse_ptr"] = "*fp32"
    sig.update({name: "i32" for name in ("stride_qb", "stride_qh", "stride_qw", "stride_ob", "stride_oh", "stride_ow",
                                         "H", "W", "SEQ_H", "SEQ_W", "windows_w", "windows_per_image", "num_heads",
                                         "num_m_tiles")})
    sig["sm_scale"] = "fp32"
    return sig


# DeepEncoder V2's causal-flow stage: prefix-LM over [n image tokens; n queries] (L = 288 / 512),
# GQA 14 / 2 heads, RoPE on load, d = 64
CAUSAL_FLOW_CASE = ("v2-causal-flow/prefix", "prefix")
CAUSAL_FLOW_GROUP = cfg.CAUSAL_FLOW_HEADS // cfg.CAUSAL_FLOW_KV_HEADS


def varlen_attention_cases():
    """CLIP over packed views (no bias, d = 64), SAM global blocks of packed views with rel-pos,
    the tables sized for the largest grid in the batch (Base 64, Large 80), and V2's causal-flow
    stage (prefix-LM mask, GQA, RoPE)."""
    from deepencoder_kernels.kernels.configs import varlen_attention_config

    cases = [("clip/packed", "plain", False, 1, False), ("sam-global/packed<=base", "rel_pos", True, cfg.sam_grid(1024), False),
             ("sam-global/packed<=large", "rel_pos", True, cfg.sam_grid(1280), False), (*CAUSAL_FLOW_CASE, False, 1, True)]
    for case, name, has_bias, side, prefix in cases:
        conf = varlen_attention_config(has_bias, side, side, prefix=prefix)
        launch = conf.pop("num_warps"), conf.pop("num_stages")
        constexprs = dict(HEAD_DIM=cfg.HEAD_DIM, HAS_BIAS=has_bias, IEEE_DOT=False, UPCAST_DOT=False, **conf,
                          STORE_LSE=prefix, HAS_PREFIX=prefix, HAS_ROPE=prefix, GROUP=CAUSAL_FLOW_GROUP if prefix else 1)
        yield case, name, constexprs, *launch


def varlen_attention_bwd_cases(kernel: str):
    """The backward's ``dq`` or ``dkv`` kernel for the forward's cases (CLIP; SAM global with rel-pos;
    V2's causal flow)."""
    from deepencoder_kernels.kernels.configs import varlen_attention_bwd_config

    cases = [("clip/packed", "plain", False, 1, False), ("sam-global/packed<=base", "rel_pos", True, cfg.sam_grid(1024), False),
             ("sam-global/packed<=large", "rel_pos_lp256", True, cfg.sam_grid(1280), False), (*CAUSAL_FLOW_CASE, False, 1, True)]
    for case, name, has_bias, side, prefix in cases:
        dq, dkv = varlen_attention_bwd_config(has_bias, side, side, prefix=prefix)
        conf = dict(dq if kernel == "dq" else dkv)
        launch = conf.pop("num_warps"), conf.pop("num_stages")
        yield case, f"{name}/{kernel}", dict(HEAD_DIM=cfg.HEAD_DIM, HAS_BIAS=has_bias, IEEE_DOT=False, UPCAST_DOT=False,
                                             **conf, HAS_PREFIX=prefix, HAS_ROPE=prefix,
                                             GROUP=CAUSAL_FLOW_GROUP if prefix else 1), *launch


def varlen_attention_bwd_signature(kernel: str, dtype: str) -> dict:
    p, f, i = "*" + dtype, "*fp32", "*i32"
    if kernel == "dq":
        sig = {"q_ptr": p, "k_ptr": p, "v_ptr": p, "out_ptr": p, "dout_ptr": p, "lse_ptr": f, "delta_ptr": f, "dq_ptr": p,
               "cu_seqlens_ptr": i, "grid_hw_ptr": i, "tables_h_ptr": p, "tables_w_ptr": p, "table_rows_ptr": i,
               "dtable_h_ptr": f, "dtable_w_ptr": f}
    else:
        sig = {"q_ptr": p, "k_ptr": p, "v_ptr": p, "dout_ptr": p, "lse_ptr": f, "delta_ptr": f, "dk_ptr": p, "dv_ptr": p,
               "cu_seqlens_ptr": i, "grid_hw_ptr": i, "tables_h_ptr": p, "tables_w_ptr": p, "table_rows_ptr": i}
    sig.update({"prefix_ptr": i, "cos_ptr": p, "sin_ptr": p})   # RoPE tables in the activations' dtype, as V2 makes them
    sig.update({name: "i32" for name in ("stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh",
                                         "stride_cos", "stride_sin", "num_heads",
                                         "num_m_tiles" if kernel == "dq" else "num_n_tiles")})
    if kernel == "dq":
        sig["program_offset"] = "i32"
    sig["sm_scale"] = "fp32"
    return sig


def varlen_attention_signature(dtype: str) -> dict:
    p = "*" + dtype
    sig = {"q_ptr": p, "k_ptr": p, "v_ptr": p, "out_ptr": p, "cu_seqlens_ptr": "*i32", "lse_ptr": "*fp32", "grid_hw_ptr": "*i32",
           "tables_h_ptr": p, "tables_w_ptr": p, "table_rows_ptr": "*i32", "prefix_ptr": "*i32", "cos_ptr": p, "sin_ptr": p}
    sig.update({name: "i32" for name in ("stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh",
                                         "stride_ot", "stride_oh", "stride_cos", "stride_sin", "num_heads", "num_m_tiles")})
    sig["sm_scale"] = "fp32"
    return sig


def compress_cases():
    """The four convs of the neck + compressor at DeepEncoder's channel counts. Grid sizes are
    run-time arguments, so one compile per step serves every mode."""
    from deepencoder_kernels.kernels.configs import compress_bwd_config, compress_config

    steps = (("neck_1x1_ln", 1, 1, 0, True, cfg.SAM_NECK_DIM), ("neck_3x3_ln", 3, 1, 1, True, cfg.SAM_NECK_DIM),
             ("net2_3x3_s2", 3, 2, 1, False, cfg.SAM_OUT_DIM // 2), ("net3_3x3_s2", 3, 2, 1, False, cfg.SAM_OUT_DIM))
    for name, ksize, stride, pad, has_ln, c_out in steps:
        for save in (False, True) if has_ln else (False,):   # training also stores the pre-norm output + stats
            entry = name + ("_save" if save else "")
            conf = compress_bwd_config(entry, c_out) if save else compress_config(name, c_out)
            launch = conf.pop("num_warps"), conf.pop("num_stages")
            yield f"all-modes/{entry}", entry, dict(KSIZE=ksize, STRIDE=stride, PAD=pad, HAS_LN=has_ln, SAVE_STATS=save,
                                                     IEEE_DOT=False, UPCAST_DOT=False, **conf), *launch


def compress_signature(dtype: str) -> dict:
    p = "*" + dtype
    sig = {"x_ptr": p, "w_ptr": p, "out_ptr": p, "ln_w_ptr": p, "ln_b_ptr": p, "pre_ptr": p, "stats_ptr": "*fp32"}
    sig.update({name: "i32" for name in ("stride_xb", "stride_xh", "stride_xw", "H", "W", "Ho", "Wo", "C_in", "C_out",
                                         "num_pixels")})
    sig["eps"] = "fp32"
    return sig


# the backward's steps: (config, kernel size, stride, pad, LayerNorm fused, channels of the dgrad tile / wgrad C_out)
COMPRESS_DGRAD_STEPS = (("neck_1x1_dgrad", 1, 1, 0, False, cfg.SAM_DIM), ("neck_3x3_dgrad_ln", 3, 1, 1, True, cfg.SAM_NECK_DIM),
                        ("net2_dgrad_ln", 3, 2, 1, True, cfg.SAM_NECK_DIM), ("net3_dgrad", 3, 2, 1, False, cfg.SAM_OUT_DIM // 2))
COMPRESS_WGRAD_STEPS = (("neck_1x1_wgrad", 1, 1, 0, False, cfg.SAM_NECK_DIM), ("neck_3x3_wgrad", 3, 1, 1, True, cfg.SAM_NECK_DIM),
                        ("net2_wgrad", 3, 2, 1, True, cfg.SAM_OUT_DIM // 2), ("net3_wgrad", 3, 2, 1, False, cfg.SAM_OUT_DIM))


def compress_bwd_cases(kind: str):
    """The backward's input-gradient (``dgrad``: LayerNorm backward fused where the input was normed)
    and weight-gradient (``wgrad``: the norm recomputed on load) kernels at DeepEncoder's channels."""
    from deepencoder_kernels.kernels.configs import compress_bwd_config

    for name, ksize, stride, pad, ln, channels in (COMPRESS_DGRAD_STEPS if kind == "dgrad" else COMPRESS_WGRAD_STEPS):
        conf = {k: v for k, v in compress_bwd_config(name, channels).items() if k not in ("PROGRAMS", "MIN_PIXELS", "MAX_SPLITS")}
        launch = conf.pop("num_warps"), conf.pop("num_stages")
        flag = "LN_BWD" if kind == "dgrad" else "LN_IN"
        yield f"all-modes/{name}", name, dict(KSIZE=ksize, STRIDE=stride, PAD=pad, **{flag: ln}, IEEE_DOT=False,
                                               UPCAST_DOT=False, **conf), *launch


def compress_bwd_signature(kind: str, dtype: str) -> dict:
    p, f = "*" + dtype, "*fp32"
    if kind == "dgrad":
        sig = {"dy_ptr": p, "w_ptr": p, "dx_ptr": p, "pre_ptr": p, "stats_ptr": f, "ln_w_ptr": p, "part_ptr": f}
        sig.update({name: "i32" for name in ("H", "W", "Ho", "Wo", "C_in", "C_out", "batch", "class_tiles")})
    else:
        sig = {"x_ptr": p, "dy_ptr": p, "part_ptr": f, "stats_ptr": f, "ln_w_ptr": p, "ln_b_ptr": p}
        sig.update({name: "i32" for name in ("stride_xb", "stride_xh", "stride_xw", "stride_ps", "stride_pt", "stride_pi",
                                             "stride_po", "H", "W", "Ho", "Wo", "C_in", "C_out", "num_pixels",
                                             "pixels_per_split")})
    return sig


def kernel_specs():
    """(report name, kernel, cases, signature for a dtype) of every shipped Triton kernel."""
    from deepencoder_kernels.kernels.compress import _conv_nhwc_dgrad_kernel, _conv_nhwc_kernel, _conv_nhwc_wgrad_kernel
    from deepencoder_kernels.kernels.rel_pos_attention import _rel_pos_attention_fwd_kernel
    from deepencoder_kernels.kernels.rel_pos_attention_backward import _rel_pos_attention_bwd_dkv_kernel, _rel_pos_attention_bwd_dq_kernel
    from deepencoder_kernels.kernels.varlen_attention import _varlen_attention_fwd_kernel
    from deepencoder_kernels.kernels.varlen_attention_backward import _varlen_attention_bwd_dkv_kernel, _varlen_attention_bwd_dq_kernel

    return [
        ("rel_pos_attention", _rel_pos_attention_fwd_kernel, rel_pos_attention_cases, rel_pos_attention_signature),
        ("rel_pos_attention_bwd_dq", _rel_pos_attention_bwd_dq_kernel, functools.partial(rel_pos_attention_bwd_cases, "dq"),
         functools.partial(rel_pos_attention_bwd_signature, "dq")),
        ("rel_pos_attention_bwd_dkv", _rel_pos_attention_bwd_dkv_kernel, functools.partial(rel_pos_attention_bwd_cases, "dkv"),
         functools.partial(rel_pos_attention_bwd_signature, "dkv")),
        ("varlen_attention", _varlen_attention_fwd_kernel, varlen_attention_cases, varlen_attention_signature),
        ("varlen_attention_bwd_dq", _varlen_attention_bwd_dq_kernel, functools.partial(varlen_attention_bwd_cases, "dq"),
         functools.partial(varlen_attention_bwd_signature, "dq")),
        ("varlen_attention_bwd_dkv", _varlen_attention_bwd_dkv_kernel, functools.partial(varlen_attention_bwd_cases, "dkv"),
         functools.partial(varlen_attention_bwd_signature, "dkv")),
        ("compress", _conv_nhwc_kernel, compress_cases, compress_signature),
        ("compress_bwd_dgrad", _conv_nhwc_dgrad_kernel, functools.partial(compress_bwd_cases, "dgrad"),
         functools.partial(compress_bwd_signature, "dgrad")),
        ("compress_bwd_wgrad", _conv_nhwc_wgrad_kernel, functools.partial(compress_bwd_cases, "wgrad"),
         functools.partial(compress_bwd_signature, "wgrad")),
    ]


def with_candidates(name, cases):
    """Each case's shipped config, then every other tuning candidate of its configs.py entry
    (``CANDIDATES``; bf16 only, fp16 compiles alike), named ``<entry>#<i>``: the tuner times only
    configs this report has seen compile cleanly."""
    from deepencoder_kernels.kernels.configs import CANDIDATES, fits

    for case, config_name, constexprs, num_warps, num_stages in cases():
        yield case, config_name, constexprs, num_warps, num_stages, DTYPES
        for i, cand in enumerate(CANDIDATES.get(name, {}).get(config_name, [])[1:], 1):
            if not fits(cand, max(constexprs.get("LP_H", 0), constexprs.get("LP_W", 0))):
                continue   # meant for smaller tables: never launched at this shape
            cand = {k: v for k, v in cand.items() if k != "MAX_LP"}
            launch = cand.pop("num_warps"), cand.pop("num_stages")
            yield f"{case} #{i}", f"{config_name}#{i}", {**constexprs, **cand}, *launch, ("bf16",)


def kernel_rows(name, kernel, cases, signature_of, targets=TARGETS, dtypes=DTYPES):
    cache: dict = {}
    for case, config_name, constexprs, num_warps, num_stages, case_dtypes in with_candidates(name, cases):
        for target in targets:
            for dtype in (d for d in dtypes if d in case_dtypes):
                row = Row(name, case, config_name, target, dtype)
                signature = {**signature_of(dtype), **{c: "constexpr" for c in constexprs}}
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
    return [row for spec in kernel_specs() for row in kernel_rows(*spec)]


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


def triton_version() -> str:
    import triton

    return ".".join(triton.__version__.split(".")[:2])


def versioned(path: str, version: str | None = None) -> str:
    """Baselines are kept per Triton version (register counts differ between releases):
    ``static_report.json`` names the family, ``static_report_triton-3.9.json`` the file for 3.9."""
    root, ext = os.path.splitext(path)
    root = re.sub(r"_triton-[0-9.]+$", "", root)
    return f"{root}_triton-{version or triton_version()}{ext}"


def to_json(rows: list[Row]) -> dict:
    import triton

    return {"triton": triton.__version__, "rows": [{**asdict(r), "key": r.key} for r in rows]}


def format_table(rows: list[Row]) -> str:
    lines = [f"{'kernel':<26}{'case':<26}{'config':<14}{'target':<8}{'dtype':<6}{'regs':>5}{'spill B':>8}{'smem B':>8}{'TC instr':>9}"]
    for r in rows:
        tail = f"  ERROR {r.error}" if r.error else ""
        lines.append(f"{r.kernel:<26}{r.case:<26}{r.config:<14}{r.target:<8}{r.dtype:<6}{r.registers:>5}"
                     f"{r.spill_bytes:>8}{r.shared_bytes:>8}{r.tensor_core_instructions:>9}{tail}")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="deepencoder-kernels static-report", description=__doc__)
    ap.add_argument("--write", help="write the report as the baseline JSON here (as <name>_triton-<X.Y>.json, the running Triton's)")
    ap.add_argument("--check", help="compare against this baseline JSON (<name>_triton-<X.Y>.json for the running Triton); "
                                    "exit 1 on a regression")
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
        path = versioned(args.check)
        if not os.path.exists(path):
            print(f"STATIC REPORT FAILED: no baseline for Triton {triton_version()} ({path}); write one with --write", file=sys.stderr)
            return 1
        print(f"baseline: {path}")
        with open(path) as f:
            baseline = json.load(f)
    found = problems(rows, baseline)
    if args.write and not found:
        with open(versioned(args.write), "w") as f:
            json.dump(data, f, indent=1)
        print(f"wrote baseline {versioned(args.write)}")
    if found:
        print("\nSTATIC REPORT FAILED:\n  " + "\n  ".join(found), file=sys.stderr)
        return 1
    print("static report: every config compiles, 0 spills, shared memory within limits, tensor cores in use")
    return 0


if __name__ == "__main__":
    sys.exit(main())
