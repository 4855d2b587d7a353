"""Calls on entry to a model's MoE blocks, found through their experts layer.

An engine's quantization method holds the experts layer, not the block around
it (SGLang builds Qwen2-MoE's router without a quantization config, so no
method of ours runs before it). A global forward pre-hook finds each block, on
its first call, as the module whose ``experts`` child is a registered layer;
work a block needs on every entry then moves to a pre-hook on that block alone,
and the global hook is removed as soon as every registered layer has been
found. A global hook sends every module call of an eager pass (prefill) down
torch's slow path (about 1.3 us more a call on the CPU here); left in place it
would cost each prefill that for every module of the model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

OnFirst = Callable[[torch.nn.Module], None]  # the block, on its first entry
OnEach = Callable[[torch.nn.Module, tuple], None]  # the block and its forward's positional arguments, every entry


class BlockHooks:
    """Per-layer calls on entry to the MoE block whose ``experts`` is the layer: ``on_first`` once, on the
    block's first forward; ``on_each`` on every forward (CUDA-graph captures hold what they launch; replays
    run no hooks)."""

    def __init__(self) -> None:
        self._first: dict[int, tuple[torch.nn.Module, OnFirst]] = {}
        self._each: dict[int, tuple[torch.nn.Module, OnEach]] = {}  # the layer kept: its id stays its own
        self._global: Any = None  # the global pre-hook's handle while it is registered
        self.blocks: list[Any] = []  # the handles of the pre-hooks on found blocks

    def on_first(self, layer: torch.nn.Module, fn: OnFirst) -> None:
        self._first[id(layer)] = (layer, fn)
        self._hook()

    def on_each(self, layer: torch.nn.Module, fn: OnEach) -> None:
        self._each[id(layer)] = (layer, fn)
        self._hook()

    @property
    def searching(self) -> bool:
        """Whether the global pre-hook is registered (some layer's block not yet entered)."""
        return self._global is not None

    def _hook(self) -> None:
        if self._global is None:
            self._global = torch.nn.modules.module.register_module_forward_pre_hook(self._find)

    def _find(self, module: torch.nn.Module, args: tuple) -> None:
        experts = module._modules.get("experts")
        if experts is None:
            return
        key = id(experts)
        first = self._first.pop(key, None)
        if first is not None:
            first[1](module)
        each = self._each.pop(key, None)
        if each is not None:
            each[1](module, args)  # this call: torch took its hook tables before this hook ran
            self.blocks.append(module.register_forward_pre_hook(each[1]))
        if not self._first and not self._each:  # every layer found: back to torch's fast path
            self._global.remove()  # torch calls the hooks from a copy of their table: safe inside one
            self._global = None
