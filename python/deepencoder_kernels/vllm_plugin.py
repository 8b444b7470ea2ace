"""vLLM plugin: DeepSeek-OCR's and DeepSeek-OCR 2's vision encoders on this package's ops in every vLLM worker.

Installing the package installs the plugin (entry point group ``vllm.general_plugins``, name
``deepencoder_kernels`` -> :func:`register`); vLLM calls ``register()`` in each process it starts.
``register()`` maps each architecture this vLLM has (``DeepseekOCRForCausalLM``,
``DeepseekOCR2ForCausalLM``) to this module's class of that name, which vLLM imports only when it
builds that model (the lazy ``"module:Class"`` form, so the plugin imports no model code in
processes that never build one). That class is a subclass of vLLM's own, whose ``load_weights``
ends with :func:`deepencoder_kernels.accelerate` on the vision towers:

- DeepSeek-OCR: ``sam_model`` (SAM blocks, neck + compressor) and ``vision_model`` (CLIP
  attentions, which work on this rank's heads under tensor parallelism and leave the all-reduce to
  vLLM's ``RowParallelLinear``);
- DeepSeek-OCR 2: ``sam_model`` and ``qwen2_model`` (the causal-flow stage: one prefix-LM GQA
  ``varlen_attention`` per layer, no mask built; vLLM runs these towers replicated on every rank).

The projector, the language model and every other architecture are left as they are; nothing the
patched forwards add reads device values to the host, so vLLM's encoder CUDA graphs can capture
them. ``load_weights`` called again (a weight reload, a trainer syncing weights into the server)
is exact: the patched forwards read the module's parameters at every call, nothing is cached.

vLLM's ``--load-format dummy`` never calls ``load_weights``, so with it the encoder is not patched.

Off switch: ``DEEPENCODER_KERNELS_VLLM_PLUGIN=0`` (or vLLM's own ``VLLM_PLUGINS`` allow-list).
When vLLM has neither model, or a class no longer looks as expected, the plugin logs one line and
vLLM runs its own code. Each worker logs once per architecture what was patched
(``vllm.deepencoder_kernels`` logger, so it appears among vLLM's own log lines).
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from typing import NamedTuple

ENV = "DEEPENCODER_KERNELS_VLLM_PLUGIN"


class Served(NamedTuple):
    module: str                    # vLLM's module holding the class
    towers: tuple[str, ...]        # the vision towers accelerate() walks
    expected: tuple[str, ...]      # the kinds a full model has (a missing kind is logged)
    name: str                      # for log lines


MODELS = {
    "DeepseekOCRForCausalLM": Served("vllm.model_executor.models.deepseek_ocr", ("sam_model", "vision_model"),
                                     ("sam block", "sam encoder", "clip attention"), "DeepSeek-OCR"),
    "DeepseekOCR2ForCausalLM": Served("vllm.model_executor.models.deepseek_ocr2", ("sam_model", "qwen2_model"),
                                      ("sam block", "sam encoder", "causal flow"), "DeepSeek-OCR 2"),
}
# the first architecture's names, as before DeepSeek-OCR 2 was served
ARCH = "DeepseekOCRForCausalLM"
VLLM_MODULE = MODELS[ARCH].module
TOWERS = MODELS[ARCH].towers
EXPECTED = MODELS[ARCH].expected

# a child of vLLM's logger: vLLM's handler and level apply, so the lines show in `vllm serve` output
log = logging.getLogger("vllm.deepencoder_kernels")
_reported: set[str] = set()


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def register() -> bool:
    """The ``vllm.general_plugins`` entry point. Returns whether any architecture was registered."""
    if not enabled():
        log.info("deepencoder-kernels: vLLM plugin off (%s=%s); DeepSeek-OCR runs vLLM's own code", ENV, os.environ[ENV])
        return False
    try:
        from vllm import ModelRegistry

        supported = set(ModelRegistry.get_supported_archs())
        found = {arch: (arch in supported, importlib.util.find_spec(served.module) is not None) for arch, served in MODELS.items()}
    except Exception as e:   # a vLLM without these names: do nothing, say so
        log.warning("deepencoder-kernels: vLLM plugin does nothing: cannot read vLLM's model registry (%s: %s)",
                    type(e).__name__, e)
        return False
    registered, absent = [], []
    for arch, (known, has_module) in found.items():
        if known and has_module:
            ModelRegistry.register_model(arch, f"{__name__}:{arch}")
            registered.append(arch)
        else:
            absent.append(f"{arch} ({'not in ModelRegistry' if not known else f'no module {MODELS[arch].module}'})")
    if not registered:
        log.warning("deepencoder-kernels: vLLM plugin does nothing: this vLLM has no %s", ", no ".join(absent))
    elif absent:
        log.info("deepencoder-kernels: vLLM plugin serves %s; this vLLM has no %s", ", ".join(registered), ", no ".join(absent))
    return bool(registered)


def __getattr__(name: str):
    # vLLM resolves "deepencoder_kernels.vllm_plugin:DeepseekOCRForCausalLM" here, once it builds the model
    if name not in MODELS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    cls = accelerated_class(name)
    globals()[name] = cls
    return cls


def accelerated_class(arch: str = ARCH):
    """vLLM's class for ``arch`` with ``load_weights`` ending in :func:`accelerate_towers`; vLLM's
    class itself (one warning) when it lacks what the subclass relies on."""
    import torch.nn as nn

    served = MODELS[arch]
    base = getattr(importlib.import_module(served.module), arch, None)
    if base is None:
        raise AttributeError(f"{served.module} has no {arch}")   # vLLM's own entry would fail the same way
    if not (isinstance(base, type) and issubclass(base, nn.Module) and callable(getattr(base, "load_weights", None))):
        log.warning("deepencoder-kernels: vLLM's %s changed (not an nn.Module with load_weights); its own code runs", arch)
        return base

    def load_weights(self, weights):
        loaded = super(cls, self).load_weights(weights)
        accelerate_towers(self, arch)
        return loaded

    cls = type(arch, (base,), {
        "__doc__": f"vLLM's {arch}, its vision encoder on deepencoder_kernels' ops once weights are loaded.",
        "load_weights": load_weights,
        # importable as deepencoder_kernels.vllm_plugin.<arch>, so it pickles by reference
        "__module__": __name__, "__qualname__": arch,
    })
    return cls


def _arch_of(model) -> str:
    for c in type(model).__mro__:
        if c.__name__ in MODELS:
            return c.__name__
    for arch, served in MODELS.items():   # by its towers
        if all(hasattr(model, t) for t in served.towers):
            return arch
    return ARCH


def accelerate_towers(model, arch: str | None = None):
    """Accelerate the vision towers of ``model`` (``arch``'s, inferred when None) in place; log once per
    process and architecture. Returns the combined report, or None when nothing could be patched
    (vLLM's code then runs)."""
    import torch.nn as nn

    from .accelerate import AccelerationReport, LeftAlone, Patched, accelerate, restore

    arch = arch or _arch_of(model)
    served = MODELS[arch]
    towers = [(n, getattr(model, n)) for n in served.towers if isinstance(getattr(model, n, None), nn.Module)]
    if not towers:
        log.warning("deepencoder-kernels: %s has no %s: vLLM's %s changed; its own code runs",
                    type(model).__name__, " / ".join(served.towers), served.name)
        return None
    report = AccelerationReport()
    try:
        for name, tower in towers:
            part = accelerate(tower)
            report.patched += [Patched(f"{name}.{p.path}" if p.path else name, p.kind, p.via) for p in part.patched]
            report.left_alone += [LeftAlone(f"{name}.{e.path}" if e.path else name, *e[1:]) for e in part.left_alone]
            report.corrected += [(f"{name}.{p}" if p else name, what) for p, what in part.corrected]
            report.original_here += [line for line in part.original_here if line not in report.original_here]
    except Exception as e:   # never take the server down: undo and run vLLM's code
        for _, tower in towers:
            restore(tower)
        log.warning("deepencoder-kernels: accelerate() failed (%s: %s); vLLM's own code runs", type(e).__name__, e)
        return None
    _log_report(model, served, report)
    return report


def _where() -> str:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return f"pid {os.getpid()}, rank {dist.get_rank()}/{dist.get_world_size()}"
    except Exception:
        pass
    return f"pid {os.getpid()}"


def _log_report(model, served: Served, report) -> None:
    counts = ", ".join(f"{report.count(k)} {k}" for k in served.expected)
    missing = [k for k in served.expected if not report.count(k)]
    if not report.patched:
        log.warning("deepencoder-kernels: found no DeepEncoder part in %s (%s): vLLM's own code runs\n%s",
                    type(model).__name__, _where(), report)
        return
    if missing:
        log.warning("deepencoder-kernels: %s: no %s recognised; those parts run vLLM's code\n%s",
                    type(model).__name__, ", ".join(missing), report)
    # once per worker process and architecture: later loads (a second model, a weight reload) go to debug
    level = logging.DEBUG if served.name in _reported else logging.INFO
    _reported.add(served.name)
    log.log(level, "deepencoder-kernels: %s encoder on deepencoder_kernels ops (%s): %s patched; %d left alone%s",
            served.name, _where(), counts, len(report.left_alone),
            f"; {len(report.corrected)} corrected" if report.corrected else "")
    log.debug("%s", report)
