"""quiver's vLLM engine plugin: a faster LoRA path for vLLM's CPU platform.

vLLM calls `register()` (entry point `vllm.general_plugins`) in every engine
process. On CPU it swaps the platform's punica wrapper, the object every LoRA
layer calls once per forward, for `QuiverPunicaWrapperCPU`
(see `punica_cpu.py` for why and how). Anywhere else it does nothing, so the
GPU path keeps vLLM's own Triton kernels. `QUIVER_CPU_LORA_PLUGIN=0` turns it
off, which gives the stock path for comparisons. Everywhere, it keeps the slots
reserved for pinned adapters out of the scheduler's reach (`pins.py`).
"""

from __future__ import annotations

import logging
import os

ENV_SWITCH = "QUIVER_CPU_LORA_PLUGIN"
WRAPPER_QUALNAME = "quiver.engine_plugin.punica_cpu.QuiverPunicaWrapperCPU"

logger = logging.getLogger("vllm.quiver_cpu_lora")


def switch_on(name: str) -> bool:
    """An on/off environment switch of the plugin's, on unless set to 0/false/no/off."""
    return os.environ.get(name, "1").strip().lower() not in ("0", "false", "no", "off")


def enabled_by_env() -> bool:
    return switch_on(ENV_SWITCH)


def register() -> None:
    # Any platform, and whatever the CPU switch says: pinning needs it (see pins.py).
    from quiver.engine_plugin.pins import reserve_pinned_slots

    reserve_pinned_slots()
    if not enabled_by_env():
        return
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    platform_cls = type(current_platform)
    # Idempotent: vLLM may call plugins more than once per process.
    if getattr(platform_cls, "_quiver_cpu_lora", False):
        return
    stock = platform_cls.get_punica_wrapper()
    if stock != "vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU":
        # Someone else (another plugin, a newer vLLM) changed the wrapper: our
        # subclass might not match it, so stay out of the way.
        logger.warning("quiver CPU LoRA plugin inactive: unexpected punica wrapper %s", stock)
        return
    platform_cls.get_punica_wrapper = classmethod(lambda cls: WRAPPER_QUALNAME)
    platform_cls._quiver_cpu_lora = True
    # vLLM's logger is configured by the time plugins load; use its hierarchy.
    from vllm.logger import init_logger

    init_logger("vllm.quiver_cpu_lora").info(
        "quiver CPU LoRA plugin active: grouped LoRA matmuls (%s=0 disables)", ENV_SWITCH
    )
