"""A checkpoint run one decoder layer at a time, its weights read lazily from safetensors.

Calibration and GPTQ need only each MoE block's inputs, and a decoder layer's
inputs are the previous layer's outputs. So the model is never whole in
memory: the hidden states of the calibration windows stay on the device
between layers (tokens x hidden x 4 bytes, 0.5 GB for 128 windows of 512
tokens at hidden 2048), and one layer's weights at a time are read from the
safetensors files onto the device, run, and dropped. A model larger than the
GPU calibrates and quantizes; host memory holds only the quantized result
(the checkpoint being written), not the model.

The layers are transformers' own modules, built on the meta device and filled
from the checkpoint; what the model's forward passes to each layer (causal
mask, rotary embeddings) is taken from that forward itself, so attention is
computed exactly as in the whole model.
"""

from __future__ import annotations

import copy
import ctypes
import functools
import gc
import glob
import json
import os
import re

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from mxserve.errors import MxServeError
from mxserve.models.adapters import MoELayerView, decoder_layers, layer_view, moe_layers
from mxserve.models.configs import arch_spec, module_name
from mxserve.models.loading import load_config

INDEX_FILE = "model.safetensors.index.json"

# Checkpoints store one Linear per expert (Mixtral: w1/w3/w2 under block_sparse_moe);
# transformers 5 modules hold them fused, mlp.experts.gate_up_proj [E, 2I, H] (gate rows
# first) and down_proj [E, H, I]. A layer read on its own is converted the same way.
_EXPERT = re.compile(r"^(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$")
_ROLE = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}


def local_checkpoint(path: str) -> str:
    """A local directory holding ``path``: itself, or the hub snapshot of a repo id (configs and safetensors)."""
    if os.path.isdir(path):
        return path
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(path, allow_patterns=["*.json", "*.safetensors"])
    except Exception as e:  # the hub's errors span several hierarchies (HTTP, offline cache, repo id)
        raise MxServeError(f"cannot fetch {path} from the Hugging Face hub: {str(e).splitlines()[0]}") from None


class CheckpointTensors:
    """A checkpoint's tensors by name, each read from its safetensors file when asked for."""

    def __init__(self, path: str):
        self.path = path
        index = os.path.join(path, INDEX_FILE)
        try:
            if os.path.isfile(index):
                with open(index) as f:
                    self.file_of = {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
            else:
                self.file_of = {}
                for file in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
                    with safe_open(file, "pt") as f:
                        self.file_of.update(dict.fromkeys(f.keys(), file))
        except (OSError, KeyError, json.JSONDecodeError, SafetensorError) as e:
            raise MxServeError(f"{path}: cannot read the safetensors weights ({e})") from None
        if not self.file_of:
            raise MxServeError(f"{path}: no .safetensors weights (mxserve loads safetensors only, never pickle)")
        self._open: dict[tuple[str, str], object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def names(self, prefix: str) -> list[str]:
        return [k for k in self.file_of if k.startswith(prefix)]

    def release(self) -> None:
        """Close the files: their memory maps hold the pages read so far (resident memory)."""
        self._open.clear()

    def get(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """The tensor, read straight onto ``device`` (no host copy on the way to a GPU)."""
        key = (self.file_of[name], str(device))
        if key not in self._open:
            self._open[key] = safe_open(key[0], "pt", device=str(device))
        return self._open[key].get_tensor(name)


def layer_state(tensors: CheckpointTensors, index: int, device: torch.device | str) -> dict[str, torch.Tensor]:
    """State dict of decoder layer ``index`` as transformers 5's layer module names it."""
    prefix = f"model.layers.{index}."
    state: dict[str, torch.Tensor] = {}
    experts: dict[int, dict[str, torch.Tensor]] = {}
    for name in tensors.names(prefix):
        local = name[len(prefix) :]
        m = _EXPERT.match(local)
        if m:
            experts.setdefault(int(m[1]), {})[_ROLE[m[2]]] = tensors.get(name, device)
        else:
            state[module_name(name)[len(prefix) :]] = tensors.get(name, device)
    if experts:
        ids = sorted(experts)
        if ids != list(range(len(ids))) or any(len(experts[e]) != 3 for e in ids):
            raise MxServeError(f"{tensors.path}: layer {index} has incomplete expert weights")
        gate_up = [torch.cat([experts[e]["gate"], experts[e]["up"]]) for e in ids]
        state["mlp.experts.gate_up_proj"] = torch.stack(gate_up)
        state["mlp.experts.down_proj"] = torch.stack([experts[e]["down"] for e in ids])
    return state


@functools.lru_cache(maxsize=1)
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to trim
        return None


def release_memory() -> None:
    """Hand freed memory back to the system between layers.

    GPU: torch's cached blocks, or a server started next (SGLang sizes its KV cache from the
    free memory) finds them held. Host: glibc keeps freed tensors below its mmap threshold
    (32 MB, so a layer's per-expert copies) in its heaps; without a trim the process grew by
    about 1.6 GB per Qwen1.5-sized layer quantized on the CPU."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def free_bytes(device: torch.device) -> int:
    """Memory free for work on ``device`` now: the GPU's free memory with what torch's allocator
    holds unused, or the host's available memory (MemAvailable: free plus what the kernel can
    reclaim)."""
    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + cached
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class _Stop(Exception):
    pass


class _Catch(nn.Module):
    """Stands in for a decoder layer: records what the model's forward passes it."""

    def __init__(self, record: list, last: bool):
        super().__init__()
        self.record, self.last = record, last

    def forward(self, hidden_states, *args, **kwargs):
        self.record.append((hidden_states, args, kwargs))
        if self.last:
            raise _Stop
        return hidden_states


class LayerwiseModel:
    """A supported MoE checkpoint whose decoder layers are loaded onto ``device`` one at a time (fp32)."""

    def __init__(self, path: str, device: torch.device | str = "cpu"):
        from transformers import AutoModelForCausalLM

        self.config = load_config(path)
        self.path = local_checkpoint(path)
        self.spec = arch_spec(self.config.model_type)
        self.device = torch.device(device)
        self.tensors = CheckpointTensors(self.path)
        with torch.device("meta"):
            self.skeleton = AutoModelForCausalLM.from_config(self.config, dtype=torch.float32)
        self.moe_views = moe_layers(self.skeleton)  # on meta tensors: shapes only; no MoE layer is an error here
        self.n_layers = len(decoder_layers(self.skeleton))
        self._args: list[list[tuple]] = []  # per batch, per layer: (args, kwargs) of the model's call

    @property
    def model_type(self) -> str:
        return self.config.model_type

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise MxServeError(f"{self.path}: checkpoint lacks {name}")
        return self.tensors.get(name)

    @torch.no_grad()
    def embed(self, windows: torch.Tensor, batch: int = 8) -> list[torch.Tensor]:
        """Hidden states [b, S, H] (fp32, on the device) entering layer 0, per batch of windows."""
        inner = self.skeleton.model
        emb = inner.embed_tokens
        emb.to_empty(device=self.device)
        emb.weight.copy_(self.tensor("model.embed_tokens.weight"))
        rotary = inner.rotary_emb
        # Its buffers are not in the file: computed on the CPU, as a whole model loaded there has them.
        with torch.device("cpu"):
            inner.rotary_emb = type(rotary)(self.config).to(self.device)
        layers = decoder_layers(self.skeleton)
        saved = list(layers)
        hidden, self._args = [], []
        try:
            for i in range(0, windows.shape[0], batch):
                record: list = []
                for j in range(len(layers)):
                    layers[j] = _Catch(record, last=j == len(layers) - 1)
                try:
                    inner(input_ids=windows[i : i + batch].to(self.device), use_cache=False)
                except _Stop:
                    pass
                hidden.append(record[0][0].float())
                self._args.append([(a, kw) for _, a, kw in record])
        finally:
            for j, layer in enumerate(saved):
                layers[j] = layer
            emb.to_empty(device="meta")
            inner.rotary_emb = rotary
        return hidden

    def layer(self, index: int) -> nn.Module:
        """Decoder layer ``index`` on the device with the checkpoint's weights (fp32)."""
        layer = copy.deepcopy(decoder_layers(self.skeleton)[index]).to_empty(device=self.device)
        missing, unexpected = layer.load_state_dict(layer_state(self.tensors, index, self.device), strict=False)
        self.tensors.release()
        if missing or unexpected:
            raise MxServeError(
                f"{self.path}: layer {index} weights do not match its config "
                f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
            )
        return layer.eval()

    def view(self, index: int, layer: nn.Module) -> MoELayerView | None:
        return layer_view(index, layer, self.spec)

    @torch.no_grad()
    def advance(self, index: int, layer: nn.Module, hidden: list[torch.Tensor],
                capture: nn.Module | None = None) -> torch.Tensor | None:  # fmt: skip
        """Run ``hidden`` through decoder layer ``index`` (replaced in place). With ``capture``,
        return that submodule's inputs [T, H] (fp32), as the whole model's forward would give them."""
        store: list[torch.Tensor] = []
        handle = None
        if capture is not None:
            handle = capture.register_forward_pre_hook(
                lambda _m, args: store.append(args[0].reshape(-1, args[0].shape[-1]).float())
            )
        try:
            for b, h in enumerate(hidden):
                args, kwargs = self._args[b][index]
                out = layer(h, *args, **kwargs)
                hidden[b] = out[0] if isinstance(out, tuple) else out
        finally:
            if handle is not None:
                handle.remove()
        return torch.cat(store) if capture is not None else None

    def outer_state(self) -> dict[str, torch.Tensor]:
        """Every tensor outside the decoder layers (embedding, final norm, LM head), as stored.

        A tied LM head is stored too: SGLang's Qwen2-MoE does not tie it and would otherwise
        serve an uninitialised head."""
        names = [k for k in self.skeleton.state_dict() if not k.startswith("model.layers.")]
        state = {}
        for k in names:
            if k not in self.tensors and k == "lm_head.weight" and getattr(self.config, "tie_word_embeddings", False):
                state[k] = self.tensor("model.embed_tokens.weight").clone()
            else:
                state[k] = self.tensor(k)
        return state
