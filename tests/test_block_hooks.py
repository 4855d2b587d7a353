"""The MoE-block entry hooks the SGLang plugin uses (fused router, early zero fill, early shared experts)."""

import torch

from mxserve.engines.block_hooks import BlockHooks


class Block(torch.nn.Module):
    """A decoder layer's MoE block: a router, then the experts layer the quantization method holds."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = torch.nn.Linear(4, 3, bias=False)
        self.experts = torch.nn.Linear(4, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.gate(x)
        return self.experts(x)


class Model(torch.nn.Module):
    def __init__(self, layers: int) -> None:
        super().__init__()
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(4) for _ in range(layers))
        self.blocks = torch.nn.ModuleList(Block() for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for norm, block in zip(self.norms, self.blocks):
            x = block(norm(x))
        return x


def global_pre_hooks() -> int:
    return len(torch.nn.modules.module._global_forward_pre_hooks)


def test_blocks_found_once_then_only_their_own_hooks_run():
    model = Model(3)
    hooks = BlockHooks()
    before = global_pre_hooks()
    firsts, entries = [], []
    for i, block in enumerate(model.blocks):
        hooks.on_first(block.experts, lambda b, i=i: firsts.append((i, b)))
        if i != 1:  # layer 1 has only its router to fuse
            hooks.on_each(block.experts, lambda b, args, i=i: entries.append((i, b, args[0].shape)))
    assert hooks.searching and global_pre_hooks() == before + 1
    x = torch.randn(2, 4)
    model(x)
    # each block found on its first call, the first-entry work done then, the per-entry work from that call on
    assert firsts == [(i, model.blocks[i]) for i in range(3)]
    assert entries == [(0, model.blocks[0], (2, 4)), (2, model.blocks[2], (2, 4))]
    # every layer found: the global hook is gone (other modules back on torch's fast path); the two blocks keep
    # a hook of their own
    assert not hooks.searching and global_pre_hooks() == before
    assert len(hooks.blocks) == 2 and len(model.blocks[0]._forward_pre_hooks) == 1
    assert not model.blocks[1]._forward_pre_hooks and not model.norms[0]._forward_pre_hooks
    entries.clear()
    model(torch.randn(1, 4))
    assert len(firsts) == 3  # once per block
    assert entries == [(0, model.blocks[0], (1, 4)), (2, model.blocks[2], (1, 4))]


def test_the_global_hook_stays_until_the_last_layer_is_entered():
    model, other = Model(1), Model(1)
    hooks = BlockHooks()
    before = global_pre_hooks()
    seen = []
    hooks.on_each(model.blocks[0].experts, lambda b, args: seen.append("model"))
    hooks.on_first(other.blocks[0].experts, lambda b: seen.append("other"))
    model(torch.randn(1, 4))
    assert seen == ["model"] and hooks.searching  # the other layer's block not yet entered
    other(torch.randn(1, 4))
    assert seen == ["model", "other"] and not hooks.searching and global_pre_hooks() == before
    model(torch.randn(1, 4))
    assert seen == ["model", "other", "model"]
