"""SGLang's Mixtral, FusedMoE experts included, under an architecture name of its own."""

from sglang.srt.models.mixtral import MixtralForCausalLM


class MxMoEMixtralForCausalLM(MixtralForCausalLM):
    """Unchanged: only the name differs, so SGLang keeps FusedMoE for the mxmoe method."""


EntryClass = MxMoEMixtralForCausalLM
