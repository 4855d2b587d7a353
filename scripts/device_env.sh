# Source on the lent GPU, in the repository root, in each call that carries
# .bundle .shr .pydeps.tar.xz and .tvm-ffi.tar.xz (serving) or .tvm-ffi-bf16.tar.xz (moe_layer.py's Marlin)
# (scripts/device_prep.sh and scripts/marlin_cache.sh make them here):
#     source scripts/device_env.sh
# SGLang 0.5.15 into /tmp/site; SGLang's Marlin kernels prebuilt for sm_90 (TVM_FFI_CACHE_DIR); the
# import-only `cutlass` stand-in for the modules of SGLang's DeepSeek-V2 that import it (the image
# lacks it), with FlashInfer's CUDA RMSNorm kept (scripts/import_standins.py says why); pulp/highspy;
# the tokenizer files the tests read (MXSERVE_SHARED). Each step is skipped when a warm machine has it.
[ -d /tmp/site/sglang ] || bash .bundle/install.sh >/dev/null || return 1
# (either archive or both: one call's carry holds one; a warm machine keeps what earlier calls brought)
for a in .tvm-ffi.tar.xz .tvm-ffi-bf16.tar.xz; do
  [ ! -f $a ] || [ -f /tmp/tvmcache/$a.done ] || { tar xf $a -C /tmp && touch /tmp/tvmcache/$a.done; } || return 1
done
[ -d /tmp/pydeps/.pydeps ] || { mkdir -p /tmp/pydeps && tar xJf .pydeps.tar.xz -C /tmp/pydeps; } || return 1
[ -d /tmp/standins ] || python3 scripts/import_standins.py /tmp/standins cutlass cuda \
    --for sglang.jit_kernel.dsa sglang.jit_kernel.cutedsl_fp8_paged_mqa_logits >/dev/null || return 1
t=.shr/models/refmoe-25m/tokenizer.json
[ -f $t ] || python3 -c "import lzma, sys; open(sys.argv[1], 'wb').write(lzma.open(sys.argv[1] + '.xz').read())" $t \
    || return 1
# refmoe-25m's weights where a first call left them (scripts/device_prep.sh, MXSERVE_REFMOE_WEIGHTS=1)
[ ! -f /tmp/refmoe/model.safetensors ] || cp -n /tmp/refmoe/* .shr/models/refmoe-25m/
export PYTHONPATH=/tmp/site:/tmp/pydeps/.pydeps:/tmp/standins MXSERVE_SHARED=$PWD/.shr TVM_FFI_CACHE_DIR=/tmp/tvmcache \
    FLASHINFER_USE_CUDA_NORM=1 PYTHONUNBUFFERED=1
