#!/usr/bin/env bash
# The serving runs behind benchmarks/results/serving-*.{json,md}, on the lent GPU
# (SGLang from the bundle of ../shared/device: bash .bundle/install.sh first).
#
#   benchmarks/serving_runs.sh qwen15 OUT            # random weights, Qwen1.5-MoE-A2.7B layers (4 of 24)
#   benchmarks/serving_runs.sh qwen15-24 OUT         # all 24 layers, against SGLang bf16, fp8 and a GPTQ copy on Marlin
#                                                    # (each server's decode steps and one prefill traced; GROUPED=1: mxserve
#                                                    # also with one launch per group of codes; GLUON_FMA=1:
#                                                    # also with the Gluon CUDA-core kernel at 1 token; =packed:
#                                                    # with its packed bf16 arithmetic; SPLIT=waves: also
#                                                    # with K split by waves at decode; EARLY=1: also with
#                                                    # the shared experts launched before the router;
#                                                    # STREAM_K=1: also on the stream-K decode grid; ROUTER=1:
#                                                    # also with each MoE block's decode routing in one launch
#                                                    # (the default since), ROUTER=0: with SGLang's router;
#                                                    # PDL=1: also with programmatic dependent launches;
#                                                    # EARLY_PDL=1: also with the shared experts early and PDL;
#                                                    # DECODE_TILES=SETTINGS: also with MXSERVE_DECODE_TILES;
#                                                    # TOPK_ROWS=0 (or 1): also with MXSERVE_TOPK_ROWS so;
#                                                    # FOLD=SECONDS: also with the statistics folded so often;
#                                                    # FOLD_THREAD=1: also folded in the scheduler's thread;
#                                                    # TOPK_GRID=1: also with MXSERVE_TOPK_GRID=1)
#                                                    # (PREP_ONLY=1: write the model and checkpoints, serve nothing;
#                                                    # MX_ONLY=1: no GPTQ copy, and mxserve's server alone;
#                                                    # FP8_ONLY=1: SGLang fp8 the only baseline; MX_GPTQ=1: the
#                                                    # GPTQ copy the only one; NO_BF16=1: no bf16; PLAN=FILE NAME=N:
#                                                    # mxserve's checkpoint from that plan instead of the committed one;
#                                                    # ALSO_PLAN=FILE:NAME: a second mxserve server from that plan;
#                                                    # METRICS=1: the GPTQ copy also with --enable-metrics;
#                                                    # METRICS_ONLY=1: only the GPTQ copy, with it)
#   benchmarks/serving_runs.sh multigpu OUT          # two GPUs (issue 14): random weights, Qwen1.5-MoE-A2.7B's shapes
#                                                    # (LAYERS=4: 4 of its 24 layers); PART=equal: greedy text of an
#                                                    # all-bf16 plan at --tp 2 and --ep 2 against one GPU; PART=speed:
#                                                    # output tokens/s of a plan made for each layout (--tp 2 at 4
#                                                    # bits: down stays 8 bits, its 704 columns a rank are not whole
#                                                    # groups; --ep 2 at 3.25) on one GPU and on two; both by default
#   benchmarks/serving_runs.sh gptq-check OUT        # 4 layers: the GPTQ copy on Marlin against its own dequantized fp16
#   benchmarks/serving_runs.sh refmoe OUT MODEL DATA # refmoe-25m; DATA holds *-calib.txt and *-dev.txt
#   benchmarks/serving_runs.sh refmoe-greedy OUT MODEL DATA  # only SGLang bf16 vs the all-bf16 plan
#
# Each quantizes the mxserve checkpoints from the committed plans (benchmarks/plans),
# then runs benchmarks/serving.py: plain SGLang bf16, SGLang's own fp8, and mxserve
# on SGLang, one server after another with the same prompts.
set -euo pipefail
cd "$(dirname "$0")/.."
what=$1 out=$2
work=${WORK:-/tmp/mxserve-serving}
mkdir -p "$out" "$work"
export PYTHONUNBUFFERED=1
py=python3
args="${SGLANG_ARGS:---attention-backend triton --sampling-backend pytorch --grammar-backend none --mem-fraction-static 0.6}"

if [ "$what" = qwen15 ]; then
  m=$work/qwen15-4l
  [ -f "$m/config.json" ] || $py benchmarks/random_model.py --config benchmarks/configs/qwen1.5-moe-a2.7b-4layers.json \
    --tokenizer "${TOKENIZER:-../shared/models/refmoe-25m}" --out "$m"
  for b in 4bit 3.25bit; do
    [ -f "$work/q15-$b/config.json" ] || $py -m mxserve.cli quantize --model "$m" \
      --plan benchmarks/plans/qwen15-4l-$b.json --out "$work/q15-$b" --quiet &
  done
  wait
  $py benchmarks/serving.py --model "$m" --ckpt 4bit="$work/q15-4bit" --ckpt 3.25bit="$work/q15-3.25bit" \
    --sglang-quant fp8 --max-tokens 64 --sglang-args "$args" --tag "Qwen1.5-MoE-A2.7B layers, 4 of 24, random weights" \
    --out "$out"
elif [ "$what" = qwen15-24 ]; then
  # issue 10's end-to-end run. Disk: the model 28.6 GB, the GPTQ copy and mxserve's checkpoint about 8 each
  m=$work/qwen15
  [ -f "$m/config.json" ] || $py benchmarks/random_model.py --config benchmarks/configs/qwen1.5-moe-a2.7b.json \
    --tokenizer "${TOKENIZER:-../shared/models/refmoe-25m}" --out "$m"
  # MX_ONLY=1: mxserve's server alone (a check of a served-path change when device time is short; its
  # baselines then come from another run)
  [ -n "${MX_ONLY:-}${FP8_ONLY:-}" ] || [ -f "$work/q15-gptq/config.json" ] ||
    $py benchmarks/gptq_copy.py --model "$m" --out "$work/q15-gptq" --device cuda
  plan=${PLAN:-benchmarks/plans/qwen15-24l-3.25bit.json} name=${NAME:-3.25bit}
  [ -f "$work/q15-24-$name/config.json" ] || $py -m mxserve.cli quantize --model "$m" --device cuda \
    --plan "$plan" --out "$work/q15-24-$name" --quiet
  # ALSO_PLAN=FILE:NAME: a second mxserve checkpoint and server from another plan (e.g. one priced for speed, r < 1)
  also=()
  if [ -n "${ALSO_PLAN:-}" ]; then
    also_name=${ALSO_PLAN##*:}
    [ -f "$work/q15-24-$also_name/config.json" ] || $py -m mxserve.cli quantize --model "$m" --device cuda \
      --plan "${ALSO_PLAN%:*}" --out "$work/q15-24-$also_name" --quiet
    also=(--ckpt "$also_name=$work/q15-24-$also_name")
  fi
  [ -z "${PREP_ONLY:-}" ] || exit 0  # the checkpoints only (while the GPU does other work), no timing
  # mxserve with one kernel launch per GEMM (the default); GROUPED=1 adds a server with one launch per
  # group of codes (about 3 min more). Every server's decode steps traced after its throughput runs
  grouped=()
  [ -z "${GROUPED:-}" ] || grouped=(--ckpt 3.25bit-grouped="$work/q15-24-3.25bit"
    --server-env mxserve-3.25bit-grouped=MXSERVE_DISPATCH=grouped)
  # GLUON_FMA=1 (or packed) adds a server whose 1-token GEMMs run on the Gluon CUDA-core kernel
  # (MXSERVE_GLUON_FMA=1, or =packed for its packed bf16 arithmetic)
  [ -z "${GLUON_FMA:-}" ] || grouped+=(--ckpt "$name-gluon-fma=$work/q15-24-$name"
    --server-env "mxserve-$name-gluon-fma=MXSERVE_GLUON_FMA=$GLUON_FMA")
  # EARLY=1 adds a server whose shared experts launch as their MoE block starts, from 2 tokens (MXSERVE_SHARED_EARLY=1;
  # one token takes the top-k's rows where they apply)
  [ -z "${EARLY:-}" ] || grouped+=(--ckpt "$name-shared-early=$work/q15-24-$name"
    --server-env "mxserve-$name-shared-early=MXSERVE_SHARED_EARLY=1")
  # ROUTER=1 adds a server whose MoE blocks route decode forwards in one launch (MXSERVE_FUSED_ROUTER=1, since made
  # the default); ROUTER=0 one with SGLang's router
  router=fused-router; [ "${ROUTER:-}" != 0 ] || router=sglang-router
  [ -z "${ROUTER:-}" ] || grouped+=(--ckpt "$name-$router=$work/q15-24-$name"
    --server-env "mxserve-$name-$router=MXSERVE_FUSED_ROUTER=$ROUTER")
  # PDL=1 adds a server whose decode MoE launches are programmatic dependent launches (MXSERVE_PDL=1)
  [ -z "${PDL:-}" ] || grouped+=(--ckpt "$name-pdl=$work/q15-24-$name" --server-env "mxserve-$name-pdl=MXSERVE_PDL=1")
  # EARLY_PDL=1 adds a server with both MXSERVE_SHARED_EARLY=1 and MXSERVE_PDL=1
  [ -z "${EARLY_PDL:-}" ] || grouped+=(--ckpt "$name-early-pdl=$work/q15-24-$name"
    --server-env "mxserve-$name-early-pdl=MXSERVE_SHARED_EARLY=1" --server-env "mxserve-$name-early-pdl=MXSERVE_PDL=1")
  # EARLY=1 and ROUTER=1 together also add a server with both
  [ -z "${EARLY:-}" ] || [ -z "${ROUTER:-}" ] || grouped+=(--ckpt "$name-early-router=$work/q15-24-$name"
    --server-env "mxserve-$name-early-router=MXSERVE_SHARED_EARLY=1"
    --server-env "mxserve-$name-early-router=MXSERVE_FUSED_ROUTER=1")
  # STREAM_K=0 (or 1) adds a server whose Gluon decode launches never (always) run on the stream-K grid
  # (MXSERVE_STREAM_K; by default below 4 rows per expert)
  [ -z "${STREAM_K:-}" ] || grouped+=(--ckpt "$name-stream-k-$STREAM_K=$work/q15-24-$name"
    --server-env "mxserve-$name-stream-k-$STREAM_K=MXSERVE_STREAM_K=$STREAM_K")
  # DECODE_TILES=SETTINGS adds a server whose decode launches take those tile fields (MXSERVE_DECODE_TILES, e.g.
  # bn=64,early=true: a moe_layer.py variant; benchmarks/pick_decode_tiles.py picks one from a layer run)
  [ -z "${DECODE_TILES:-}" ] || grouped+=(--ckpt "$name-decode-tiles=$work/q15-24-$name"
    --server-env "mxserve-$name-decode-tiles=MXSERVE_DECODE_TILES=$DECODE_TILES")
  # TOPK_ROWS=0 (or 1) adds a server whose one-token forwards align their rows (take the top-k's rows straight, with
  # no alignment launch: the default since the forty-second session; MXSERVE_TOPK_ROWS)
  [ -z "${TOPK_ROWS:-}" ] || grouped+=(--ckpt "$name-topk-rows-$TOPK_ROWS=$work/q15-24-$name"
    --server-env "mxserve-$name-topk-rows-$TOPK_ROWS=MXSERVE_TOPK_ROWS=$TOPK_ROWS")
  # TOPK_GRID=1 adds a server whose decode forwards on the grid take the routed slots straight from the top-k
  # (MXSERVE_TOPK_GRID=1: no alignment launch)
  [ -z "${TOPK_GRID:-}" ] || grouped+=(--ckpt "$name-topk-grid=$work/q15-24-$name"
    --server-env "mxserve-$name-topk-grid=MXSERVE_TOPK_GRID=$TOPK_GRID")
  # FOLD=SECONDS adds a server whose routing statistics are folded every SECONDS (mxserve launch --stats-interval;
  # 1 by default): what the fold, in the scheduler process, costs the steps beside it
  [ -z "${FOLD:-}" ] || grouped+=(--ckpt "$name-fold$FOLD=$work/q15-24-$name"
    --launch-args "$name-fold$FOLD=--stats-interval $FOLD")
  # FOLD_THREAD=1 adds a server that folds its statistics in a thread of SGLang's scheduler (MXSERVE_STATS_FOLD=thread:
  # the default before the fiftieth session; since, a fold process of its own, router_stats/apart.py)
  [ -z "${FOLD_THREAD:-}" ] || grouped+=(--ckpt "$name-fold-thread=$work/q15-24-$name"
    --server-env "mxserve-$name-fold-thread=MXSERVE_STATS_FOLD=thread")
  # SPLIT=waves adds a server whose decode launches split K by waves (MXSERVE_DECODE_SPLIT=waves)
  [ -z "${SPLIT:-}" ] || grouped+=(--ckpt "$name-split-$SPLIT=$work/q15-24-$name"
    --server-env "mxserve-$name-split-$SPLIT=MXSERVE_DECODE_SPLIT=$SPLIT")
  baselines=(--sglang-quant fp8 --sglang-ckpt gptq-marlin="$work/q15-gptq")
  [ -z "${FP8_ONLY:-}" ] || baselines=(--skip-bf16 --sglang-quant fp8)
  [ -z "${MX_ONLY:-}" ] || baselines=(--skip-bf16)
  [ -z "${NO_BF16:-}" ] || baselines=(--skip-bf16 "${baselines[@]}")  # NO_BF16=1: plain SGLang bf16 left out
  # MX_GPTQ=1: the GPTQ copy on Marlin the only baseline
  [ -z "${MX_GPTQ:-}" ] || baselines=(--skip-bf16 --sglang-ckpt gptq-marlin="$work/q15-gptq")
  # METRICS=1: the GPTQ copy also with --enable-metrics, which mxserve launch always passes (its Prometheus
  # series): what SGLang's own metrics cost a decode step, on the CPU, where the GPU forward is equal
  [ -z "${METRICS:-}" ] || baselines+=(--sglang-ckpt gptq-marlin-metrics="$work/q15-gptq"
    --plain-args "gptq-marlin-metrics=--enable-metrics")
  # METRICS_ONLY=1: the GPTQ copy with --enable-metrics the only baseline (one call's worth of servers)
  [ -z "${METRICS_ONLY:-}" ] || baselines=(--skip-bf16 --sglang-ckpt gptq-marlin-metrics="$work/q15-gptq"
    --plain-args "gptq-marlin-metrics=--enable-metrics")
  # NO_PLAIN=1: no server of the plan without options (when another run of the same session has timed it)
  plain=(--ckpt "$name=$work/q15-24-$name")
  [ -z "${NO_PLAIN:-}" ] || plain=()
  $py benchmarks/serving.py --model "$m" "${baselines[@]}" \
    "${plain[@]}" "${also[@]}" "${grouped[@]}" --profile-steps 20 --profile-prefill \
    --startup-timeout "${STARTUP_TIMEOUT:-420}" --max-tokens 128 --concurrency 1 8 32 --sglang-args "$args" \
    --tag "Qwen1.5-MoE-A2.7B, all 24 layers, random weights" --out "$out"
elif [ "$what" = multigpu ]; then
  layers=${LAYERS:-24} part=${PART:-both}
  cfg=benchmarks/configs/qwen1.5-moe-a2.7b.json m=$work/qwen15 m1="$py -m mxserve.cli"
  [ "$layers" = 24 ] || cfg=benchmarks/configs/qwen1.5-moe-a2.7b-4layers.json m=$work/qwen15-4l
  [ -f "$m/config.json" ] || $py benchmarks/random_model.py --config $cfg \
    --tokenizer "${TOKENIZER:-../shared/models/refmoe-25m}" --out "$m"
  # the plans, from the synthetic profile (random weights: its accuracy means nothing), each made for its layout
  PYTHONPATH=.:${PYTHONPATH:-} $py benchmarks/synthetic_profile.py --config $cfg --out "$out/profile.json"
  schemes=bf16,w8a16,w8a8fp8,w4a16g128,w3a16g128,w2a16g128,w1a16g128
  $m1 plan --profile "$out/profile.json" --budget 16bit --schemes bf16 --out "$out/plan-bf16.json"
  $m1 plan --profile "$out/profile.json" --budget 4bit --schemes $schemes --tp 2 --out "$out/plan-tp2.json"
  $m1 plan --profile "$out/profile.json" --budget 3.25bit --schemes $schemes --ep 2 --out "$out/plan-ep2.json"
  for p in bf16 tp2 ep2; do
    [ -f "$work/q15-$layers-$p/config.json" ] || $m1 quantize --model "$m" --device cuda --plan "$out/plan-$p.json" \
      --out "$work/q15-$layers-$p" --quiet
  done
  tag="Qwen1.5-MoE-A2.7B, $layers of 24 layers, random weights, one GPU and two"
  if [ "$part" != speed ]; then
    # one GPU against two, plain SGLang's too: where random weights leave near ties, its own all-reduce can flip one
    # (serving.py reports the top-1 minus top-2 log-prob where two texts part)
    $py benchmarks/serving.py --model "$m" --sglang-ckpt tp2="$m" --plain-args "tp2=--tp-size 2" \
      --ckpt bf16="$work/q15-$layers-bf16" --ckpt bf16-tp2="$work/q15-$layers-bf16" --launch-args "bf16-tp2=--tp 2" \
      --ckpt bf16-ep2="$work/q15-$layers-bf16" --launch-args "bf16-ep2=--ep 2" \
      --compare mxserve-bf16:sglang-bf16 --compare mxserve-bf16-tp2:mxserve-bf16 \
      --compare mxserve-bf16-ep2:mxserve-bf16 --compare sglang-tp2:sglang-bf16 \
      --max-tokens 64 --concurrency 8 --rounds 1 --sglang-args "$args" --tag "$tag: greedy text" --out "$out/equal" ||
      echo "a server of the greedy comparison failed: $out/equal/serving.md"  # the throughput runs go on
  fi
  if [ "$part" != equal ]; then
    $py benchmarks/serving.py --model "$m" --skip-bf16 \
      --ckpt tp-plan="$work/q15-$layers-tp2" --ckpt tp-plan-tp2="$work/q15-$layers-tp2" \
      --launch-args "tp-plan-tp2=--tp 2" --ckpt ep-plan="$work/q15-$layers-ep2" \
      --ckpt ep-plan-ep2="$work/q15-$layers-ep2" --launch-args "ep-plan-ep2=--ep 2" \
      --max-tokens 128 --concurrency 1 8 32 --sglang-args "$args" --tag "$tag: throughput" --out "$out/speed"
  fi
elif [ "$what" = gptq-check ]; then
  m=$work/qwen15-4l
  [ -f "$m/config.json" ] || $py benchmarks/random_model.py --config benchmarks/configs/qwen1.5-moe-a2.7b-4layers.json \
    --tokenizer "${TOKENIZER:-../shared/models/refmoe-25m}" --out "$m"
  [ -f "$work/q15-4l-gptq/config.json" ] || $py benchmarks/gptq_copy.py --model "$m" --out "$work/q15-4l-gptq" \
    --dequantized "$work/q15-4l-deq" --device cuda
  $py benchmarks/serving.py --model "$m" --skip-bf16 --sglang-ckpt gptq="$work/q15-4l-gptq" \
    --sglang-ckpt deq="$work/q15-4l-deq" --compare sglang-gptq:sglang-deq --max-tokens 32 --concurrency 8 \
    --sglang-args "$args" --tag "GPTQ copy on Marlin against its dequantized weights in fp16, Qwen1.5 4 layers" \
    --out "$out"
elif [ "$what" = refmoe ] || [ "$what" = refmoe-greedy ]; then
  src=$3 data=$4
  # sglang 0.5.15's Qwen2-MoE does not tie lm_head to the embedding; refmoe-25m ties
  # them, so plain SGLang gets a copy with lm_head.weight written out.
  model=$work/refmoe-untied
  [ -f "$model/config.json" ] || $py - "$src" "$model" <<'PY'
import json, os, shutil, sys
from safetensors.torch import load_file, save_file
src, dst = sys.argv[1:]
os.makedirs(dst, exist_ok=True)
for f in os.listdir(src):
    if f not in ("model.safetensors", "config.json"):
        shutil.copy(os.path.join(src, f), dst)
t = load_file(os.path.join(src, "model.safetensors"))
t["lm_head.weight"] = t["model.embed_tokens.weight"].clone()
save_file(t, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
cfg = json.load(open(os.path.join(src, "config.json")))
cfg["tie_word_embeddings"] = False
json.dump(cfg, open(os.path.join(dst, "config.json"), "w"), indent=2)
PY
  plans="bf16 4bit 3.25bit" more="--ckpt 4bit=$work/ref-4bit --ckpt 3.25bit=$work/ref-3.25bit --sglang-quant fp8"
  [ "$what" = refmoe ] || plans=bf16 more=""
  for b in $plans; do
    [ -f "$work/ref-$b/config.json" ] || $py -m mxserve.cli quantize --model "$src" \
      --plan benchmarks/plans/refmoe-$b.json --data "$data"/*-calib.txt --out "$work/ref-$b" --quiet &
  done
  wait
  # shellcheck disable=SC2086
  # bf16plan runs wholly-bf16 layers as SGLang does (the default); bf16kernel sends them through mxserve's kernel
  $py benchmarks/serving.py --model "$model" --ckpt bf16plan="$work/ref-bf16" --ckpt bf16kernel="$work/ref-bf16" \
    --launch-args "bf16kernel=--bf16-layers kernel" $more --equal mxserve-bf16plan:sglang-bf16 \
    --compare mxserve-bf16kernel:sglang-bf16 \
    --prompts "$data"/*-dev.txt --n-prompts 16 --max-tokens 64 --sglang-args "$args" --tag refmoe-25m --out "$out"
else
  echo "usage: $0 qwen15|qwen15-24|multigpu|gptq-check|refmoe|refmoe-greedy OUT [MODEL DATA]" >&2
  exit 2
fi
