#!/usr/bin/env bash
# The GPU runs still owed to issues 10 and 13, as one chain that outlives a device call.
#
# A device call lasts at most 600 s and returns at most 8 files; a machine left idle for 30 s is
# given back with everything on it. So the chain runs in the background (setsid) and each call
# polls it, then packs what exists into one file, $OUT/results.tgz, with the status in stdout:
#
#     source scripts/device_env.sh && scripts/device_runs.sh start && scripts/device_runs.sh wait 560
#     source scripts/device_env.sh && scripts/device_runs.sh start && scripts/device_runs.sh wait 580   # next calls, at once
#
# `start` does nothing where the chain already runs, and starts it over on a fresh machine.
# Phases, in order; the timed ones run alone on the GPU:
#   1. untimed, side by side: the SGLang GPU tests of every architecture, the tiny-DeepSeek probe,
#      the 24-layer checkpoints (PREP_ONLY) and, where the disk holds both, gptq-check;
#   2. timed: serving_runs.sh qwen15-24 (end to end against bf16, fp8 and GPTQ on Marlin);
#   3. timed: cold_start.py on refmoe-25m's shapes;
#   4. timed: moe_layer.py, decode sizes, with the 80-register variant;
#   5. timed: tune_tiles.py, prefill tiles of Qwen1.5's shapes (copy its JSON to mxkernels/tiles/).
set -uo pipefail
cd "$(dirname "$0")/.."
res=/tmp/res
export TOKENIZER=.shr/models/refmoe-25m WORK=/tmp/w

say() { echo "$(date +%T) $*" >> $res/status.txt; }

phase1() {
  mkdir -p $res/tests $res/probe
  local small="--attention-backend triton --sampling-backend pytorch --grammar-backend none --mem-fraction-static 0.9"
  (OMP_NUM_THREADS=4 PREP_ONLY=1 benchmarks/serving_runs.sh qwen15-24 $res/e2e > $res/prep.log 2>&1; say "prep rc=$?") &
  if [ "$(df --output=avail -B1G /tmp | tail -1)" -ge 60 ]; then
    (OMP_NUM_THREADS=3 WORK=/tmp/w4 SGLANG_ARGS="$small --max-total-tokens 65536" \
      benchmarks/serving_runs.sh gptq-check $res/gc > $res/gc.log 2>&1; say "gptq-check rc=$?"; rm -rf /tmp/w4) &
  else say "gptq-check skipped: the disk holds the 24-layer checkpoints only"; fi
  python3 scripts/sglang_tiny_probe.py --out $res/probe > $res/probe.txt 2>&1 &
  for a in qwen2_moe qwen3_moe olmoe mixtral deepseek_v2; do
    (MXSERVE_TEST_SGLANG_ARGS="$small --max-total-tokens 16384" MXSERVE_TEST_SERVER_LOGS=$res/tests/servers_$a.log \
      python3 -m pytest -q -m gpu tests/test_sglang_gpu.py -k $a --basetemp=/tmp/pt_$a -rA -p no:cacheprovider \
      > $res/tests/$a.log 2>&1; say "tests $a rc=$? $(tail -1 $res/tests/$a.log)") &
  done
  wait
  [ -f /tmp/w/q15-24-3.25bit/config.json ] || { say "no 24-layer checkpoint (prep failed)"; return 1; }
}

phase2() {
  benchmarks/serving_runs.sh qwen15-24 $res/e2e > $res/e2e.log 2>&1
  say "e2e rc=$?"
  pkill -f "[s]glang.launch_server"
  rm -rf /tmp/w  # the disk for the next phases
}

phase3() {
  python3 benchmarks/random_model.py --config benchmarks/configs/refmoe-25m.json --tokenizer $TOKENIZER --out /tmp/cm \
    > /dev/null 2>&1
  python3 benchmarks/cold_start.py --model /tmp/cm --plan benchmarks/plans/refmoe-3.25bit.json --out $res/cold \
    > $res/cold.log 2>&1
  say "cold start rc=$?"
}

phase4() {
  python3 benchmarks/moe_layer.py --ours-only --layouts "Gluon, BM 8" --tokens 1 2 4 8 --out $res/decode \
    > $res/decode.log 2>&1
  say "moe_layer decode rc=$?"
}

phase5() {
  python3 benchmarks/tune_tiles.py --models qwen1.5-moe-a2.7b --classes weight-only fp8 --tokens 1024 4096 8192 \
    --out $res/tiles/tiles.json > $res/tiles.log 2>&1
  say "tune_tiles rc=$?"
}

case "${1:-}" in
  start)
    [ -f $res/status.txt ] && exit 0
    mkdir -p $res
    say "chain started on $(nvidia-smi --query-gpu=name --format=csv,noheader)"
    setsid bash -c "source scripts/device_env.sh; $(declare -f say phase1 phase2 phase3 phase4 phase5);
      res=$res; phase1 && say 'phase 1 done' && phase2; phase3; phase4; phase5; say 'chain ended'; touch $res/ended" \
      > $res/chain.log 2>&1 < /dev/null &
    ;;
  wait)
    t0=$(date +%s)
    while [ ! -f $res/ended ] && [ $(($(date +%s) - t0)) -lt "${2:-560}" ]; do sleep 5; done
    cat $res/status.txt
    tar czf "${OUT:-/tmp}/results.tgz" -C $res --exclude='*.safetensors' .
    ;;
  *) echo "usage: $0 start | wait SECONDS" >&2; exit 2 ;;
esac
