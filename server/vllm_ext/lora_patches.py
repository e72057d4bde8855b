"""Policy adapters on the CPU engine: grouped LoRA ops (`lora_grouped`) and a compiled engine with
LoRA on (`lora_compiled`), both CPU only; the ops themselves are in `server.vllm_ext.lora_ops`."""

from __future__ import annotations

import inspect

from server.vllm_ext.registry import PatchMismatch, check_method, own


def punica_cpu():
    from vllm.lora.punica_wrapper import punica_cpu

    return punica_cpu


# --- grouped ops ----------------------------------------------------------------------------------

def grouped_targets() -> tuple:
    return (punica_cpu(),)


def probe_grouped(module) -> None:
    """`module` (vllm.lora.punica_wrapper.punica_cpu) must call the torch ops by the names and
    parameters `server.vllm_ext.lora_ops` replaces."""
    from server.vllm_ext import lora_ops

    for name in lora_ops.OPS:
        theirs = getattr(module, name, None)
        if not callable(theirs):
            raise PatchMismatch(f"{module.__name__}.{name} is missing")
        ours, their = (inspect.signature(f).parameters.values() for f in (getattr(lora_ops, name), theirs))
        shape = lambda params: [(p.name if p.default is not p.empty else "", p.kind) for p in params]  # noqa: E731
        if shape(ours) != shape(their):  # called positionally, optional arguments by name
            raise PatchMismatch(f"{module.__name__}.{name} no longer takes the arguments of lora_ops.{name}")


def apply_grouped(module) -> None:
    """Make vLLM's CPU punica wrapper multiply each adapter's tokens as one matrix product. Idempotent."""
    from server.vllm_ext import lora_ops

    for name in lora_ops.OPS:
        setattr(module, name, getattr(lora_ops, name))


# --- compiled engine with LoRA --------------------------------------------------------------------

def compiled_targets() -> tuple:
    from vllm.platforms.cpu import CpuPlatform

    return punica_cpu().PunicaWrapperCPU, CpuPlatform


def probe_compiled(wrapper_cls: type, platform_cls: type) -> None:
    """`wrapper_cls` (PunicaWrapperCPU) has the methods `lora_ops.CompiledPunica` replaces, with
    their parameters; `platform_cls` (CpuPlatform) is the one that turns compilation off for LoRA,
    in the way `apply_compiled` undoes. That last check reads the method's source: the switch is
    one branch inside a config check that only a full VllmConfig could exercise."""
    check_method(wrapper_cls, "update_metadata", ("mapping", "lora_index_to_id", "max_loras", "vocab_size"))
    check_method(wrapper_cls, "add_lora_linear", ("y", "x", "lora_a_stacked", "lora_b_stacked", "scale",
                                                  "output_slices"))
    check_method(wrapper_cls, "add_shrink", ("y", "x", "lora_a_stacked", "scale"))
    check_method(wrapper_cls, "add_expand", ("y", "x", "lora_b_stacked", "output_slices", "offset_start",
                                             "add_inputs"))
    check_method(wrapper_cls, "add_lora_embedding", ("y", "x", "lora_b_stacked", "add_inputs"))
    check_method(platform_cls, "check_and_update_config", ("vllm_config",))
    try:
        source = inspect.getsource(platform_cls.check_and_update_config)
    except (OSError, TypeError):
        raise PatchMismatch(f"{platform_cls.__name__}.check_and_update_config has no readable source") from None
    if source.count("lora_config") != 1:
        raise PatchMismatch(f"{platform_cls.__name__}.check_and_update_config no longer reads lora_config once "
                            "(to turn compilation off)")


def apply_compiled(wrapper_cls: type, platform_cls: type) -> None:
    """Serve LoRA with the engine compiled on CPU. Idempotent.

    vLLM's CPU platform sets `CompilationMode.NONE` whenever `lora_config` is set, because its
    punica wrapper branches in Python on per-step state that a traced model would freeze. The
    wrapper's model-side methods become custom ops (`lora_ops.patch_compiled`), which a trace keeps
    as opaque calls, and the platform's config check runs as if LoRA were off, its one use of
    `lora_config` being that switch (the probe checks). With `enforce_eager` the engine stays
    uncompiled as always, and so does an engine started with `lora_compile` off
    (`common.engine_args.LORA_COMPILE_KEY` in vLLM's `additional_config`)."""
    from common.engine_args import LORA_COMPILE_KEY
    from server.vllm_ext import lora_ops

    lora_ops.patch_compiled(wrapper_cls)
    if own(platform_cls, "_iro_lora_compiled"):
        return
    original = platform_cls.check_and_update_config.__func__

    def check_and_update_config(cls, vllm_config) -> None:
        if not (getattr(vllm_config, "additional_config", None) or {}).get(LORA_COMPILE_KEY, True):
            return original(cls, vllm_config)  # asked for vLLM's default: uncompiled with LoRA
        lora, vllm_config.lora_config = vllm_config.lora_config, None
        try:
            return original(cls, vllm_config)
        finally:
            vllm_config.lora_config = lora

    platform_cls.check_and_update_config = classmethod(check_and_update_config)
    platform_cls._iro_lora_compiled = True
