"""Engines that serve an mxserve checkpoint: SGLang (GPU) and the embedded one."""

# How layers the plan leaves wholly in bf16 run on SGLang (sglang_plugin says why):
# SGLang's own unquantized MoE, or mxserve's kernel. Here so the CLI needs neither torch nor sglang.
BF16_LAYERS = ("sglang", "kernel")
