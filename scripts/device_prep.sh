#!/usr/bin/env bash
# Prepare, on this CPU machine, what a call on the lent GPU carries (all git-ignored):
#   .bundle  SGLang 0.5.15 for the device image (../shared/device/build-sglang-bundle.sh), ~46 MB
#   .shr     the reference model's tokenizer files, for tests (MXSERVE_SHARED=$PWD/.shr), <1 MB
#   .refmoe  (MXSERVE_REFMOE_WEIGHTS=1 only) the reference model's weights and config, 50 MB: below
#   .pydeps  pulp and highspy for the device's Python 3.12 (PYTHONPATH), CBC binaries left out, ~8 MB;
#            carried as .pydeps.tar.xz (2.5 MB), which scripts/device_env.sh unpacks
# A call carries at most 64 MiB, the tracked files included: .bundle, .shr, .pydeps.tar.xz and one of
# .tvm-ffi.tar.xz / .tvm-ffi-bf16.tar.xz (scripts/marlin_cache.sh) fit; refmoe-25m itself does not.
# SGLang's Marlin MoE (a baseline of benchmarks/moe_layer.py) is built apart: scripts/marlin_cache.sh.
# On the device:  source scripts/device_env.sh
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${MXSERVE_SHARED:-../shared}

[ -f .bundle/install.sh ] || bash "$shared/device/build-sglang-bundle.sh" .bundle
# packed again at xz's highest level (2 MB less): with the traces the tree holds, the default's does not fit
if [ ! -f .bundle/.xz9 ]; then
    xz -dc .bundle/site.tar.xz | xz -9e -T2 -c > .bundle/site.tar.xz.part
    mv .bundle/site.tar.xz.part .bundle/site.tar.xz && touch .bundle/.xz9
fi

mkdir -p .shr/models/refmoe-25m
for f in tokenizer.json tokenizer_config.json chat_template.jinja; do
    cp "$shared/models/refmoe-25m/$f" .shr/models/refmoe-25m/
done
# the tokenizer xz-compressed (547 KB -> 69 KB): the tracked files grew until a call was 15 KB over 64 MiB
# (2026-12-05); scripts/device_env.sh restores it on the GPU
xz -9 -f .shr/models/refmoe-25m/tokenizer.json
# MXSERVE_REFMOE_WEIGHTS=1: the model itself too, in .refmoe (50 MB), for the GPU tests that serve it (issue 14's on
# two GPUs). It does not fit one call beside .bundle: a first call carries [".refmoe"] alone and copies it to
# /tmp/refmoe, which the machine keeps while warm; scripts/device_env.sh puts it beside the tokenizer files.
if [ -n "${MXSERVE_REFMOE_WEIGHTS:-}" ]; then
    mkdir -p .refmoe
    cp "$shared/models/refmoe-25m/config.json" "$shared/models/refmoe-25m/generation_config.json" \
        "$shared/models/refmoe-25m/model.safetensors" .refmoe/
fi

if [ ! -d .pydeps/pulp ]; then
    spec() { .venv/bin/python - "$1" <<'EOF'
import re, sys, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print(next(d for d in deps if re.match(sys.argv[1] + r"\b", d)))
EOF
    }
    tmp=$(mktemp -d)
    .venv/bin/pip download -q --no-deps --python-version 3.12 --only-binary=:all: \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$tmp" "$(spec pulp)" "$(spec highspy)"
    mkdir -p .pydeps
    for w in "$tmp"/*.whl; do python3 -m zipfile -e "$w" .pydeps; done
    rm -rf "$tmp" .pydeps/pulp/solverdir .pydeps/pulp/tests  # mxserve solves with HiGHS
fi

[ .pydeps.tar.xz -nt .pydeps/pulp ] || tar cJf .pydeps.tar.xz .pydeps
du -sh .bundle .shr .pydeps .pydeps.tar.xz
