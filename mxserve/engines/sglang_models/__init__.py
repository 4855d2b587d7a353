"""Model classes mxserve adds to SGLang's registry (``SGLANG_EXTERNAL_MODEL_PACKAGE``).

SGLang builds a quantized Mixtral as ``QuantMixtralForCausalLM`` (one linear layer per
expert, no FusedMoE) for every quantization method outside a fixed list, so the mxmoe
method would never see the experts. ``mixtral.MxMoEMixtralForCausalLM`` is SGLang's own
``MixtralForCausalLM`` under a name that list does not catch; the launcher names it in the
checkpoint's ``architectures`` (sglang_launch.model_overrides). SGLang imports each module
here when it builds its model registry, after its own models.
"""
