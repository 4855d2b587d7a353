#!/usr/bin/env bash
# Build SGLang's Marlin kernels for sm_90 (H100/H200) on this CPU machine, into .tvm-ffi.tar.xz and
# .tvm-ffi-bf16.tar.xz (git-ignored), so that a GPU call does not spend minutes of device time on their JIT builds: the
# MoE kernel (about 460 s each) for bf16 (moe_layer.py's baseline) and fp16 (the GPTQ copy of
# gptq_copy.py, an fp16 model: SGLang's Marlin MoE wants fp16 activations with GPTQ's fp16 scales),
# and the fp16 dense GEMM and the repack that the GPTQ copy's shared experts and weight loading
# take. Each module is built per dtype: with only bf16 ones here, the GPTQ server was still in its
# first CUDA-graph capture after 4 minutes (H200, 2026-12-03, sixth session), most likely building
# its fp16 modules on the device. On 2026-12-04 `ps` on the device showed nvcc building the fp16
# SiluAndMul (activation) and rotary (fused_rope) modules there during that capture (one 68 s capture
# step with the KV-cache module; benchmarks/results/gptq_server_jit_h200_s14.txt): they are built
# here too. Modules already in .tvm-ffi.tar.xz are kept and not built again; others are dropped,
# since the carry must fit 64 MiB.
#
# SGLang's load_jit loads a prebuilt .so from $TVM_FFI_CACHE_DIR/<module>__arch_9.0__tvmffi_<v>/
# directly when it is there (no ninja, no compiler on the device). The directory name hashes the
# kernel's sources, so the bundle of ../shared/device (scripts/device_prep.sh) must be the one the
# device runs. Needs nvcc 13 (CUDA_HOME, default /usr/local/cuda) and PyPI; about 10 minutes of one
# core. On the device: tar xf .tvm-ffi.tar.xz -C /tmp && export TVM_FFI_CACHE_DIR=/tmp/tvmcache
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f .bundle/site.tar.xz ] || { echo "run scripts/device_prep.sh first (it builds .bundle)" >&2; exit 2; }
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
[ -x "$CUDA_HOME/bin/nvcc" ] || { echo "no nvcc under $CUDA_HOME (set CUDA_HOME)" >&2; exit 2; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/site" "$work/py/sglang" "$work/tvmcache"
for a in .tvm-ffi.tar.xz .tvm-ffi-bf16.tar.xz; do [ ! -f $a ] || tar xf $a -C "$work"; done
tar xJf .bundle/site.tar.xz -C "$work/site"

# The bundle is for the device's Python 3.12; this machine's Python needs its own builds of the
# bundle's compiled modules on the import path of the build (same versions), and a package
# stand-in for sglang that skips its __init__ (which imports the whole server). The activation
# module imports sglang.srt.utils, which wants psutil (on the device's image, not in the bundle) and
# torchvision (an import-only stand-in: PyPI's does not load beside this machine's torch).
version() { ls "$work/site" | sed -n "s/^$1-\(.*\)\.dist-info$/\1/p"; }
.venv/bin/pip install -q --no-deps --only-binary=:all: --target "$work/py" \
    "apache-tvm-ffi==$(version apache_tvm_ffi)" "pydantic_core==$(version pydantic_core)" \
    "orjson==$(version orjson)" ninja psutil
echo "__path__ = ['$work/site/sglang']" > "$work/py/sglang/__init__.py"
.venv/bin/python scripts/import_standins.py "$work/standins" torchvision --for sglang.srt.utils.common >/dev/null

PATH="$work/py/bin:$PATH" TVM_FFI_CACHE_DIR="$work/tvmcache" PYTHONPATH="$work/py:$work/site:$work/standins" \
    .venv/bin/python - <<'EOF'
import time

import torch
from sglang.jit_kernel.utils import override_jit_cuda_arch

t0 = time.time()
with override_jit_cuda_arch(9, 0):  # sm_90, as on the lent H100/H200
    import sglang.jit_kernel.activation as activation
    import sglang.jit_kernel.gptq_marlin as dense
    import sglang.jit_kernel.gptq_marlin_repack as repack
    import sglang.jit_kernel.moe_wna16_marlin as marlin
    import sglang.jit_kernel.rope as rope

    marlin._jit_moe_wna16_marlin_module(torch.bfloat16)
    marlin._jit_moe_wna16_marlin_module(torch.float16)
    repack._jit_gptq_marlin_repack_module()
    dense._jit_gptq_marlin_module(torch.float16)
    # the fp16 GPTQ copy's own elementwise kernels (a bf16 server before it builds only bf16 ones):
    # SiluAndMul, and Qwen's neox-style rotary embedding on 128-wide heads
    activation._jit_activation_module(torch.float16)
    rope._jit_fused_rope_module(True, 128, torch.float16)
print(f"Marlin MoE (bf16, fp16), GPTQ Marlin GEMM (fp16), repack, fp16 activation and rope built for sm_90 "
      f"in {time.time() - t0:.0f} s")
EOF
# only the modules above (their names carry the dtype): an older cache's bf16 dense GEMM goes
for d in "$work"/tvmcache/*/; do
  case "$(basename "$d")" in
    *moe_wna16_marlin_bf16_t_* | *moe_wna16_marlin_fp16_t_* | *gptq_marlin_repack_* | *gptq_marlin_fp16_t_* | \
      *activation_fp16_t_* | *fused_rope_*fp16_t_*) ;;
    *) echo "dropping $(basename "$d")"; rm -rf "$d" ;;
  esac
done
# xz, without the object files the .so repeats, in two archives: with .bundle, .shr, .pydeps.tar.xz and
# the tracked files a device call's 64 MiB holds one of them, not both (all modules in one archive,
# 8.3 MB, stopped fitting on 2026-12-07). .tvm-ffi.tar.xz: what serving's fp16 GPTQ copy loads (5.4 MB);
# .tvm-ffi-bf16.tar.xz: the bf16 Marlin MoE and the repack, what moe_layer.py's baseline loads (3 MB).
here=$PWD
(cd "$work" && tar cJf "$here/.tvm-ffi.tar.xz" --exclude='*.o' --exclude='*moe_wna16_marlin_bf16_t_*' tvmcache &&
  tar cJf "$here/.tvm-ffi-bf16.tar.xz" --exclude='*.o' tvmcache/*moe_wna16_marlin_bf16_t_* tvmcache/*gptq_marlin_repack_*)
ls -la .tvm-ffi.tar.xz .tvm-ffi-bf16.tar.xz
