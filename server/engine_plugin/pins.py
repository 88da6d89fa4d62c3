"""Slots kept free for pinned adapters (`QUIVER_PINNED_SLOTS`, passed by the gateway).

vLLM's `pin_lora` keeps an adapter in its slot, but its scheduler knows nothing of pins: it admits up to
`max_loras` distinct adapters into a batch. With one slot pinned to an adapter outside that batch, the worker
then has one slot too few: activating the batch's last adapter evicts one the batch uses, and the engine core
dies on the missing slot (`convert_mapping`'s KeyError). So the scheduler is given `max_loras - reserved`
while the worker keeps all `max_loras` slots: a batch plus every pin always fits. The reservation is fixed at
start (the scheduler asserts its running batch never exceeds its limit, so the limit cannot move under it).
"""

from __future__ import annotations

import copy
import os

ENV = "QUIVER_PINNED_SLOTS"


def reserved_slots() -> int:
    try:
        return max(0, int(os.environ.get(ENV, "0") or 0))
    except ValueError:
        return 0


def reserve_pinned_slots() -> None:
    reserved = reserved_slots()
    if reserved == 0:
        return
    from vllm.v1.core.sched.scheduler import Scheduler  # AsyncScheduler subclasses it

    if getattr(Scheduler, "_quiver_pinned_slots", None) is not None:
        return  # vLLM may call plugins more than once per process
    stock_init = Scheduler.__init__

    def __init__(self, *args, **kwargs) -> None:
        stock_init(self, *args, **kwargs)
        if self.lora_config is not None:
            # A copy: the worker reads the same config for its slot count, which must stay max_loras.
            limited = copy.copy(self.lora_config)
            limited.max_loras = max(1, self.lora_config.max_loras - reserved)
            self.lora_config = limited

    Scheduler.__init__ = __init__
    Scheduler._quiver_pinned_slots = reserved
