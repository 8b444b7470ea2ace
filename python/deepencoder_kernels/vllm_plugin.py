"""vLLM plugin: DeepSeek-OCR's vision encoder on this package's ops in every vLLM worker.

Installing the package installs the plugin (entry point group ``vllm.general_plugins``, name
``deepencoder_kernels`` -> :func:`register`); vLLM calls ``register()`` in each process it starts.
``register()`` maps the architecture ``DeepseekOCRForCausalLM`` to this module's class of that
name, which vLLM imports only when it builds that model (the lazy ``"module:Class"`` form, so
the plugin imports no model code in processes that never build one). That class is a subclass
of vLLM's own, whose ``load_weights`` ends with :func:`deepencoder_kernels.accelerate` on the two
vision towers (``sam_model``, ``vision_model``): SAM blocks, the SAM neck + compressor and the
CLIP attentions run on the fused ops; the projector, the language model and every other
architecture are left as they are. The patched CLIP attention works on this rank's heads under
tensor parallelism and leaves the all-reduce to vLLM's ``RowParallelLinear``; nothing it adds
reads device values to the host, so vLLM's encoder CUDA graphs can capture it.

vLLM's ``--load-format dummy`` never calls ``load_weights``, so with it the encoder is not patched.

Off switch: ``DEEPENCODER_KERNELS_VLLM_PLUGIN=0`` (or vLLM's own ``VLLM_PLUGINS`` allow-list).
When vLLM has no DeepSeek-OCR, or its class no longer looks as expected, the plugin logs one line
and vLLM runs its own code. Each worker logs once what was patched (``vllm.deepencoder_kernels``
logger, so it appears among vLLM's own log lines).
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os

ARCH = "DeepseekOCRForCausalLM"
VLLM_MODULE = "vllm.model_executor.models.deepseek_ocr"
ENV = "DEEPENCODER_KERNELS_VLLM_PLUGIN"
TOWERS = ("sam_model", "vision_model")
EXPECTED = ("sam block", "sam encoder", "clip attention")

# a child of vLLM's logger: vLLM's handler and level apply, so the lines show in `vllm serve` output
log = logging.getLogger("vllm.deepencoder_kernels")
_reported = False


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def register() -> bool:
    """The ``vllm.general_plugins`` entry point. Returns whether the architecture was registered."""
    if not enabled():
        log.info("deepencoder-kernels: vLLM plugin off (%s=%s); DeepSeek-OCR runs vLLM's own code", ENV, os.environ[ENV])
        return False
    try:
        from vllm import ModelRegistry

        known = ARCH in ModelRegistry.get_supported_archs()
        has_module = importlib.util.find_spec(VLLM_MODULE) is not None
    except Exception as e:   # a vLLM without these names: do nothing, say so
        log.warning("deepencoder-kernels: vLLM plugin does nothing: cannot read vLLM's model registry (%s: %s)",
                    type(e).__name__, e)
        return False
    if not (known and has_module):
        log.warning("deepencoder-kernels: vLLM plugin does nothing: this vLLM has no %s (%s)", ARCH,
                    "not in ModelRegistry" if not known else f"no module {VLLM_MODULE}")
        return False
    ModelRegistry.register_model(ARCH, f"{__name__}:{ARCH}")
    return True


def __getattr__(name: str):
    # vLLM resolves "deepencoder_kernels.vllm_plugin:DeepseekOCRForCausalLM" here, once it builds the model
    if name != ARCH:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    cls = accelerated_class()
    globals()[name] = cls
    return cls


def accelerated_class():
    """vLLM's DeepSeek-OCR class with ``load_weights`` ending in :func:`accelerate_towers`; vLLM's
    class itself (one warning) when it lacks what the subclass relies on."""
    import torch.nn as nn

    base = getattr(importlib.import_module(VLLM_MODULE), ARCH, None)
    if base is None:
        raise AttributeError(f"{VLLM_MODULE} has no {ARCH}")   # vLLM's own entry would fail the same way
    if not (isinstance(base, type) and issubclass(base, nn.Module) and callable(getattr(base, "load_weights", None))):
        log.warning("deepencoder-kernels: vLLM's %s changed (not an nn.Module with load_weights); its own code runs", ARCH)
        return base

    class DeepseekOCRForCausalLM(base):
        __doc__ = f"vLLM's {ARCH}, its vision encoder on deepencoder_kernels' ops once weights are loaded."

        def load_weights(self, weights):
            loaded = super().load_weights(weights)
            accelerate_towers(self)
            return loaded

    # importable as deepencoder_kernels.vllm_plugin.DeepseekOCRForCausalLM, so it pickles by reference
    DeepseekOCRForCausalLM.__module__, DeepseekOCRForCausalLM.__qualname__ = __name__, ARCH
    return DeepseekOCRForCausalLM


def accelerate_towers(model):
    """Accelerate ``model.sam_model`` and ``model.vision_model`` in place; log once per process.
    Returns the combined report, or None when nothing could be patched (vLLM's code then runs)."""
    import torch.nn as nn

    from .accelerate import AccelerationReport, accelerate, restore

    towers = [(n, getattr(model, n)) for n in TOWERS if isinstance(getattr(model, n, None), nn.Module)]
    if not towers:
        log.warning("deepencoder-kernels: %s has no %s: vLLM's DeepSeek-OCR changed; its own code runs",
                    type(model).__name__, " / ".join(TOWERS))
        return None
    report = AccelerationReport()
    try:
        for name, tower in towers:
            part = accelerate(tower)
            report.patched += [(f"{name}.{p}" if p else name, k) for p, k in part.patched]
            report.left_alone += [(f"{name}.{p}" if p else name, k, why) for p, k, why in part.left_alone]
    except Exception as e:   # never take the server down: undo and run vLLM's code
        for _, tower in towers:
            restore(tower)
        log.warning("deepencoder-kernels: accelerate() failed (%s: %s); vLLM's own code runs", type(e).__name__, e)
        return None
    _log_report(model, report)
    return report


def _where() -> str:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return f"pid {os.getpid()}, rank {dist.get_rank()}/{dist.get_world_size()}"
    except Exception:
        pass
    return f"pid {os.getpid()}"


def _log_report(model, report) -> None:
    global _reported
    counts = ", ".join(f"{report.count(k)} {k}" for k in EXPECTED)
    missing = [k for k in EXPECTED if not report.count(k)]
    if not report.patched:
        log.warning("deepencoder-kernels: found no DeepEncoder part in %s (%s): vLLM's own code runs\n%s",
                    type(model).__name__, _where(), report)
        return
    if missing:
        log.warning("deepencoder-kernels: %s: no %s recognised; those parts run vLLM's code\n%s",
                    type(model).__name__, ", ".join(missing), report)
    # once per worker process: later loads (a second model, a weight reload) go to debug
    level = logging.DEBUG if _reported else logging.INFO
    _reported = True
    log.log(level, "deepencoder-kernels: DeepSeek-OCR encoder on deepencoder_kernels ops (%s): %s patched; "
            "%d left alone", _where(), counts, len(report.left_alone))
    log.debug("%s", report)
