#!/usr/bin/env bash
# The GPU runs still owed to issues 10 and 14, as one chain that outlives a device call.
#
# A device call lasts at most 600 s and returns at most 8 files; a machine left idle for 30 s is
# given back with everything on it. So the chain runs in the background (setsid) and each call
# polls it, then packs what exists into one file, $OUT/results.tgz, with the status in stdout:
#
#     source scripts/device_env.sh && scripts/device_runs.sh start 22 5 21 && scripts/device_runs.sh wait 540   # carry: benchmarks/README.md
#     source scripts/device_env.sh && scripts/device_runs.sh start && scripts/device_runs.sh wait 560   # next calls, at once
#
# The phases below 38 are the record of past runs: some name options removed since (MXSERVE_L2_PREFETCH,
# MXSERVE_ROW_AMAX_IN_GEMM, MXSERVE_SILU_IN_GEMM, MXSERVE_SUM_IN_GEMM, MXSERVE_ROUTER_ALIGN; phase 57's ring, Tiles.ring):
# rerun, `mxserve launch` refuses them, a kernel benchmark measures the default in their place and `--set` refuses an
# unknown field. Next: `start 96` (the narrow plan beside the GPTQ copy, by default and with MXSERVE_PDL=1; ~9 min), then
# `start 97` (benchmarks/README.md).
#
# `start 3 4 6` runs those phases, in that order (phase 2 needs phase 1's checkpoints); `start` alone
# does nothing where a chain already runs, and fails on a fresh machine (so the `&& wait` after it
# does not spend the budget waiting on nothing).
# Phases, in order; the timed ones run alone on the GPU:
#   1. untimed, side by side: the 24-layer checkpoints (PREP_ONLY) and the kernel GPU tests of what
#      changed last (session 5: the slab test fixed to compare one kernel with itself; the grouped
#      dispatch, the shared gate and -1 ids inside the launches, the counter's host mirror passed);
#   2. timed: serving_runs.sh qwen15-24 (end to end against bf16, fp8 and GPTQ on Marlin, every
#      server's decode steps traced; the grouped launches are timed per layer in phase 3);
#   3. timed: moe_layer.py with a layer of the served 24-layer plan's tiers, single and grouped launches;
#   4. timed: moe_layer.py at 4096 and 8192 tokens on Qwen1.5's shape, with its tuned prefill tiles;
#   5. timed: cold_start.py on refmoe-25m's shapes (mxserve launch now precompiles while SGLang starts);
#   6. timed: `mxserve profile` on Qwen1.5's and DeepSeek-V2-Lite's shapes (the planner's kernel
#      profile with this session's kernels; issue 10 item 4);
#   7. untimed: the SGLang GPU tests of every architecture, then all kernel GPU tests;
#   8. (only when asked: `start 8`) a short check of the seventh session's served-path changes (below).
#   9. (only when asked: `start 9`) a plan for decode priced with this GPU's kernel profile, served (below).
#  10. (only when asked: `start 10`) the eighth session's packed bf16 1-token kernel: tests, layer, served
#      beside every baseline of issue 10.
#  11. (only when asked: `start 11`) the 1-token layer with K split other ways and 128 registers (waves).
#  12. (only when asked: `start 12`) end to end in one call: checkpoints, SGLang fp8, mxserve (also split by
#      waves) and the GPTQ copy on Marlin.
#  13. (only when asked: `start 13`) the shared experts launched early (MXSERVE_SHARED_EARLY=1): GPU tests,
#      then end to end beside the default and the GPTQ copy on Marlin.
#  14. (only when asked: `start 14`) ncu on the 8-token layer's Gluon launches and on Marlin's; the Gluon
#      kernel's padding slots loading no activations (skip_pad), tested and timed.
#  15. (only when asked: `start 15`) the kernel GPU tests beside the checkpoints; end to end in three timed rounds
#      (the early launch beside the default, the GPTQ copy with and without --enable-metrics); prefill; cold start.
#  16. (only when asked: `start 16`) the fp8 prefill tiles re-tuned; ncu with source-level stalls at 8 tokens.
#  17. (only when asked: `start 17 4 16 5`) the GPU tests of the eleventh session's kernel changes alone, so
#      that the kernel-level runs (prefill, fp8 tiles, ncu, cold start) go first and end to end waits.
#  18. (only when asked: `start 18`) the twelfth session's changes: the fused per-token quantization's and the
#      Gluon kernel's GPU tests beside the checkpoints, prefill (fp8), the K split by bits, end to end in rounds,
#      cold start.
#  19. (only when asked: `start 19`) phase 18's kernel half, one call; 20. (`start 20`) its end to end, one call.
#  21. (only when asked: `start 21`) DeepSeek-V2-Lite's prefill again, every variant in three rotated rounds.
#  22. (only when asked: `start 22`) the sixteenth session's decode kernel: its GPU tests, then the decode layer
#      at 16, 64 and 1 tokens beside Marlin.
#  23. (only when asked: `start 23`) what bounds that layer: kernel times and ncu at 16 and 64 tokens (ours and
#      Marlin's), and at Mixtral's 1 token.
#  24. (only when asked: `start 24`) the stream-K Gluon kernel (Tiles.stream_k): its GPU tests, then the decode
#      layer at 1, 8, 16 and 64 tokens beside the picked layout and Marlin, then ncu on its launches.
#  25. (only when asked: `start 25`) stream-K in SGLang: its GPU tests, then end to end, the default (stream-K
#      since the eighteenth session) beside MXSERVE_STREAM_K=0 and the GPTQ copy on Marlin (~14 minutes).
#  26. (only when asked: `start 26`) stream-K picked below 4 rows per expert (the eighteenth session), its grid
#      sized by the kernel's registers: the decode layer beside the layouts picked before and Marlin, the GPU
#      tests of stream-K, then its SGLang test (~7 min).
#  28. (only when asked: `start 28`) the nineteenth session's changes (the routing counter on the second stream
#      under stream-K; the Gluon kernel's 3-bit planes joined before one MMA) and the served plan's tiers: the
#      Gluon kernel's GPU tests, the second stream's and the counter's, then the decode layer with
#      plans/qwen15-24l-3.25bit.json's tiers (43% w3, as served end to end) at 1 to 32 tokens, stream-K beside
#      the unbalanced grid and Marlin (~7 min).
#  29. (only when asked: `start 29`) a plan priced for speed, end to end: this GPU's kernel profile with the
#      current kernels, the 24-layer plan at 3.25 bits at r = 0.25 for 8-token forwards priced with it, served
#      beside the committed plan (r = 1: 43% w3, the slowest code a tile) and the GPTQ copy on Marlin (~14 min).
#  30. (only when asked: `start 30`) the twentieth session's rules (stream-K off from 1.5 rows for 3 and 8-bit codes,
#      in its first form; decode plans without what the decode kernel does not run): the r = 0.25 plan made so,
#      served beside the GPTQ copy (~9 min).
#  31. (only when asked: `start 31`) the stream-K rule by the share of costly codes, end to end: the committed plan
#      and the r = 0.25 plan beside the GPTQ copy (~14 min), the layer at an eighth and a quarter of costly tiers
#      (~2 min) (run in the twenty-first session; every kernel GPU test, once its third step, left for a session
#      with kernel changes).
#  32. (only when asked: `start 32`) stream-K's K tiles dealt out by cost (commit f72222b): its GPU tests, the layer
#      on both deals, end to end with stream-K forced for the committed plan (~15 min: two calls).
#  33. (only when asked: `start 33`) the shared experts started early on the stream-K grid and the router in one
#      launch: their kernel tests, end to end the r = 0.25 plan alone, with MXSERVE_SHARED_EARLY=1, with
#      MXSERVE_FUSED_ROUTER=1 and with both beside the GPTQ copy (~12 min), the layer on stream-K at both tile widths
#      (~2 min), their SGLang tests (~5 min), then every kernel GPU test (~13 min).
#  34. (only when asked: `start 34`) what phase 33's one call left out: the fused router's kernel and SGLang tests,
#      end to end the r = 0.25 plan with it against the GPTQ copy (~8 min).
#  35. (only when asked: `start 35`) programmatic dependent launch (MXSERVE_PDL=1), the router's layouts, fewer
#      launches a layer (the rows laid out by the router's launch, MXSERVE_ROUTER_ALIGN=1; the SiLU in stream-K's
#      gate/up launch, MXSERVE_SILU_IN_GEMM=1; the top-k sum in its down launch, MXSERVE_SUM_IN_GEMM=1) and the
#      GEMMs' L2 prefetch (MXSERVE_L2_PREFETCH=1): their kernel
#      tests, the router's launch by layout (benchmarks/router.py), the layer in each mode and on stream-K at both
#      tile widths, end to end the r = 0.25 plan alone, with PDL, with fewer launches and with all of them, beside
#      the GPTQ copy (~20 min).
#  36. (only when asked: `start 36`) the fused router (now the default) under the Qwen3-MoE, OLMoE and Mixtral
#      SGLang tests, PDL's, the laid-out rows' and the top-k sum's SGLang tests (~9 min), then every kernel GPU test
#      (~13 min). Run
#      as `start 35 37 36`.
#  37. (only when asked: `start 37`) prefill with the programs taken a few blocks at a time (Tiles.group_m) and with
#      the down GEMM's row maxima taken by gate/up (MXSERVE_ROW_AMAX_IN_GEMM=1, removed since): their kernel tests, DeepSeek-V2-Lite's
#      prefill layer beside every baseline in two rotated rounds, each variant's kernels launch by launch, then its fp8
#      tiles tuned over those fields (~13 min).
#  38. (only when asked: `start 38`) phase 36's SGLang tests and every kernel GPU test side by side (~13 min), after the
#      row maxima in gate/up were removed (twenty-sixth session).
#  39. (only when asked: `start 39`) phase 5's cold start without the metrics run, three warm rounds (~10 min).
#  40. (only when asked: `start 40 39`) after the twenty-sixth session's removals: the fused router's and the prefill
#      group_m kernel GPU tests, and Qwen2-MoE's SGLang tests (the fused router with the shared gate) (~7 min).
#  41. (only when asked: `start 40 41 39`) what the decode GEMMs' warps wait on, every stall reason (the eighteenth
#      session's ncu printed only the largest, 2.4 of 6.7 cycles an instruction): ncu on the Gluon launches at 16
#      tokens (stream-K) and 64 (the unbalanced grid), mixed 3.25 bits, and on Marlin's at 16 where its prebuilt
#      modules are carried; then stream-K with more programs an SM (gate/up capped at 128 registers, 4 an SM; BN 64
#      at 80, 6) timed beside the picked layout at 1 to 16 tokens (~6 min).
#  45. (only when asked: `start 45`, one GPU) the twenty-eighth session's decode options: their kernel GPU tests, ncu's
#      stall reasons at 16 tokens with the next tile's loads kept first (Tiles.early: ptxas sinks them past most of
#      gate/up's MMAs otherwise) beside the picked layout, then the layer at 1, 8, 16 and 64 tokens with those loads
#      first, and with 1 and 2-bit codes unpacked in place (Tiles.place), beside the picked layout and Marlin where
#      its prebuilt modules are carried (~8 min).
#  46. (only when asked: `start 45 46`) end to end with phase 45's winner: the 24-layer checkpoints and the GPTQ copy,
#      then benchmarks/pick_decode_tiles.py takes the variant of the served plan's tiers fastest against the picked
#      layout (geometric mean over 1 to 64 tokens, both routings, under 0.97x), and serves it as MXSERVE_DECODE_TILES
#      beside the default and the GPTQ copy on Marlin (~12 min; nothing served where no variant won).
#  47. (only when asked: `start 47 48`, one GPU) the twenty-ninth session's variants: the loads kept first at the picked
#      layout's programs an SM (BN 128 at 168 registers with down at 128; the served plan's BN 64 at 128), a few
#      spills each: their GPU tests, ncu at 16 tokens, the layer at 1 to 64 tokens beside the picked layout, the 1 and
#      2-bit codes in place again, and Marlin where carried (~6 min).
#  48. (only when asked: `start 47 48`) phase 46 on phase 47's layer: the served plan's winner, if any, end to end.
#  49. (only when asked: `start 49`) our w4 layer against Marlin's under ncu, 16 tokens, uniform routing (~4 min).
#  50. (only when asked: `start 50`) the codes tiled (arena.tile_words) against row by row: launch times, ncu, the
#      layer at 1 to 64 tokens both ways beside Marlin, the layout's GPU tests (~12 min).
#  51. (only when asked: `start 51`) the decode variants on the tiled codes, and pick_decode_tiles.py's pick (~7 min).
#  52. (only when asked: `start 52 6 39`) the tiled codes served: Qwen2-MoE's and DeepSeek-V2's SGLang tests, the layer's
#      8 and 16-row blocks and its blocks 2 or 4 at a time, end to end beside the GPTQ copy on Marlin (~20 min); then
#      the kernel profile (6), cold start (39).
#  53. (only when asked: `start 53 52 6 39`) ncu's DRAM bytes of the tiled w4 layer, Mixtral at 16 and 64 tokens, the
#      blocks as launched and 4 at a time (~4 min).
#  54. (only when asked: `start 54 53`) the scales tiled and the blocks 2 or 4 at a time: the layer beside every baseline
#      at 1, 16 and 64 tokens, their GPU tests beside the checkpoints, end to end beside the GPTQ copy (~22 min).
#  55. (only when asked: `start 55 39`) a plan priced with the H100's kernel profile of the thirty-second session
#      (r = 0.25, 8 tokens: 3% w3) served beside the committed plan and the GPTQ copy on Marlin, and phase 56's pick if
#      one won (~10 to 13 min).
#  56. (only when asked: `start 56 55 39`) the activations through shared memory (Tiles.staged) and 32-row blocks: their
#      GPU tests, the layer at 8 to 64 tokens beside the picked layout and Marlin, the pick, ncu at Mixtral's 64 (~9 min).
#  68. (only when asked: `start 68`) end to end after the routing-statistics fold change, the GPTQ copy with and without
#      --enable-metrics, every server's requests also streamed one at a time (~12 min).
#  69. (only when asked: `start 69 68`) the scales and zeros in pair order: their kernel GPU tests, then the layer beside
#      every baseline at 1, 16 and 64 tokens (~9 min).
#  70. (only when asked: `start 70 68`) the GPU tests of the pair order the thirty-ninth session's budget left: the
#      CUDA-core layouts and the whole layer, then the SGLang tests of phase 60 (~8 min).
#  71. (only when asked: `start 71`) 16-row blocks capped at 168 registers or on 64-row tiles, beside the held 8 and
#      the uncapped 16, at 16 and 64 tokens (~4 min): is it their registers that make them slow?
#  72. (only when asked: `start 72 60 71`, fortieth session) issue 10 item 4 with the current kernels: the kernel profile
#      (phase 6), the 24-layer plan at r = 0.25 priced with it for PLAN_TOKENS (8) forwards, its checkpoint beside the
#      pair order's last kernel tests, then end to end: the committed plan, that plan, the GPTQ copy with and without
#      --enable-metrics (~14 min). Next (`env PLAN_TOKENS=1 scripts/device_runs.sh start 72`): with the profile's
#      1-row launches on the stream-K grid (fixed after the fortieth session's run) and the recording on one thread.
#  73. (only when asked: `start 73`, written in the forty-first session) one token's rows straight from its top-k
#      (MXSERVE_TOPK_ROWS=1: no alignment launch at one request) and the down GEMM on 128-row tiles (one wave at 8
#      requests): the kernel GPU tests beside the checkpoints of the forty-first session's 1-token plan, the layer at 1
#      and 8 tokens, end to end (that plan alone, with each, and the GPTQ copy), then the SGLang test (~22 min, three
#      calls).
#  74. (only when asked: `start 74`, written in the forty-second session) with the top-k's rows the default and the
#      MoE-block hooks per block: the host's time of an eager forward (benchmarks/host_overhead.py); the layer at 8 and
#      16 tokens with the down GEMM's K split in 2 and 3 and the shared experts started early; their kernel GPU
#      tests beside the checkpoints of the 1-token plan; end to end, that plan as served by default, with the shared
#      experts started before the router from 2 tokens and on the stream-K grid at every decode size (the shared
#      experts' own launches end the MoE section at 8 requests), beside the GPTQ copy, each server's prefill of one
#      prompt traced; then the SGLang tests of the top-k's rows, of the fused router and of the shared experts
#      started early (~27 min, three calls). Never ran: the chain's list of functions lacked it (forty-third session);
#      removed, its parts ran as phase 75 or wait as phase 76.
#  75. (only when asked: `start 75`, forty-third session) phase 74 cut to that session's budget: the host time with the
#      launches' picks kept and afresh, the early start's GPU test, end to end by default beside the GPTQ copy, the
#      SGLang tests of the top-k's rows and the fused router (~11 min, two calls).
#  76. (only when asked: `start 76`, forty-fourth session) what phase 75 left of 74, cut to that session's budget:
#      the layer at 8 and 16 tokens with the down GEMM's K split in 2 and 3, on the stream-K grid and with the grid's
#      routed slots straight from the top-k (MXSERVE_TOPK_GRID); the GPU tests of the top-k's rows beside the
#      checkpoints; end to end at 1 and 8 requests by default, with MXSERVE_TOPK_GRID=1 and with the statistics
#      folded every 5 s (~9 min, two calls; stream-K end to end, the GPTQ copy and the SGLang test of the shared
#      experts started early left out).
#  77. (only when asked: `start 77`, forty-fourth session) phase 76 cut to about 5 minutes: Qwen1.5's layer at 8 and
#      16 tokens, the grid aligned beside its top-k rows and the down GEMM's K split, then the grid's top-k GPU tests
#      (~3 min, one call).
#  78. (only when asked: `start 77 78`, forty-fifth session) phase 76's end to end after phase 77: the 1-token plan's
#      checkpoints, then serving.py at 1 and 8 requests by default, with MXSERVE_TOPK_GRID=1 where phase 77's GPU tests
#      passed, and with the statistics folded every 5 s (~6 min).
#  79. (only when asked: `start 79`, forty-fifth session) phase 77 at 8 tokens only, the grid aligned beside its top-k
#      rows, then the grid's top-k GPU tests (~2.5 min, one call).
#  80. (only when asked: `start 80 81`, forty-sixth session) the layer at 8 and 16 tokens, stream-K and the grid each
#      aligned and with the top-k rows (stream-K's uncapped and at 168 registers), then the GPU tests of both (~3.5 min).
#  82. (only when asked: `start 82 81`) phase 80 at 8 tokens: the grid (served there) and stream-K, each aligned and
#      with the top-k rows, then the same GPU tests (~3 min).
#  83. (only when asked: `start 83 84`, forty-seventh session) stream-K's top-k rows without gl.cumsum: the six GPU
#      tests of the top-k rows, then the layer at 8 tokens: stream-K and the grid, each aligned and with the top-k rows,
#      and the down GEMM's K split in 2 and 3 (~4 min; ran in the forty-eighth session).
#  84. (after 83) phase 81 gated on phase 83's tests, without the server folding its statistics every 5 s (~4.5 min).
#  85. (only when asked: `start 85`, forty-eighth session) phase 84 alone on a fresh machine, gated on phase 83's
#      committed test log (~5 min).
#  86. (only when asked: `start 86`, forty-ninth session) the acceptance run with MXSERVE_TOPK_GRID the default: the
#      1-token plan's checkpoint and the GPTQ copy, then end to end at 1, 8 and 32 requests, each server's requests
#      also through SGLang's /generate, decode steps traced (~7 min; ran in the forty-ninth session).
#  87. (only when asked: `start 87`, after the forty-ninth session) phase 86 with a third server whose statistics are
#      folded every hour (none in the timed rounds): whether the fold's stalls are the time beside the steps that
#      ours loses against the copy (5 to 24 ms a request), each round's least / median / most latency beside the mean
#      and SGLang's own request histograms (the copy with --enable-metrics, as mxserve always runs); then the SGLang
#      stream-K test of DeepSeek-V2 on the Gluon kernel's schemes (~12 min).
#  88. (only when asked: `start 88`, after the forty-ninth session) the SGLang tests of the shared experts launched
#      early, Qwen2-MoE and DeepSeek-V2 side by side, now on the Gluon kernel's schemes (~5 min).
#  89. (only when asked: `start 89`, after the fiftieth session) the acceptance run with the statistics folded in a
#      process of their own (router_stats/apart.py, the default since the fiftieth session), a server folding in the
#      scheduler's thread beside it (MXSERVE_STATS_FOLD=thread) and the GPTQ copy with --enable-metrics, at 1, 8 and
#      32 requests; then the SGLang tests of the mixed checkpoints, which read the live decode bytes from /metrics,
#      Qwen2-MoE and DeepSeek-V2 side by side (~12 min)
#  90. (only when asked: `start 90`, after phase 89 on the same machine) phase 89's default server and the GPTQ copy
#      with --enable-metrics again, at 1, 8 and 32 requests (~4 min)
#  91. (only when asked: `start 91`, after the fifty-first session) the 3.25-bit plan of w4 and w2 alone (the narrow
#      codes) beside the default 1-token plan (37% w3) and the GPTQ copy with --enable-metrics, at 1, 8 and 32 requests
#      (~9 min)
#  92. (only when asked: `start 92`) the same with the fortieth session's 8-token plan (2% w3, 1% w8) (~9 min)
#  93. (only when asked: `start 93`) phase 91 without the 1-token plan's server: the narrow plan beside the GPTQ copy
#      with --enable-metrics, at 1, 8 and 32 requests (~6 min)
#  94. (only when asked: `start 94`) phase 93 with a third server, the narrow plan with MXSERVE_SHARED_EARLY=1 (the
#      shared experts apart, started beside the router) (~8 min)
#  95. (only when asked: `start 95`) phase 93 with a third server, the narrow plan with MXSERVE_PDL=1 (~8 min)
#  96. (only when asked: `start 96`) the Gluon GEMMs programmatic too: the GPU tests of PDL, then the narrow plan by
#      default and with PDL (BOTH=1: and with PDL and its shared experts early), beside the GPTQ copy (~9 min)
#  97. (only when asked: `start 97`, after 96) the narrow plan with its shared experts early and the plan kept on
#      stream-K (`plan --keep-stream-k`), beside the GPTQ copy (~6 min)
#  81. (after 80 or 82) phase 78 gated on phase 80's tests: end to end at 1 and 8 requests, by default, with
#      MXSERVE_TOPK_GRID=1 (the grid's top-k rows at 8 requests: the served t1 plan keeps 8 tokens off stream-K) and
#      with the statistics folded every 5 s (~6 min).
# On a machine of two GPUs (a kind such as nvidia-h100-x2), issue 14's runs:
#  42. (only when asked: `start 42 43`) the two-GPU tests (tests/test_sglang_multigpu.py: greedy text at --tp 2 and
#      --ep 2 against one GPU, a forced swap on both ranks under load) on refmoe-25m (its weights from a call of their
#      own first: MXSERVE_REFMOE_WEIGHTS=1 scripts/device_prep.sh, benchmarks/README.md) and on a random-weight
#      model of Qwen1.5-MoE-A2.7B's shapes (4 of its 24 layers) (~15 min).
#  43. (only when asked) throughput on one GPU and on two: `serving_runs.sh multigpu` (4 layers, the plans made for
#      --tp 2 and --ep 2, each on one GPU and on its two) (~7 min).
#  44. (only when asked) the tests on the tiny model, and the greedy texts of the Qwen1.5-shaped model served by plain
#      SGLang and by mxserve at --tp-size 2 beside one GPU (where a near tie flips a token, whose it is) (~12 min).
# In session 5 all kernel GPU tests in phase 1 took 13 min beside the rest (784 s, 37 tests) and held
# the timed phases back until the machine was taken back: the whole file now runs last.
set -uo pipefail
cd "$(dirname "$0")/.."
res=/tmp/res
export TOKENIZER=.shr/models/refmoe-25m WORK=/tmp/w
export PLAN_SCHEMES=bf16,w8a16,w8a8fp8,w4a16g128,w3a16g128,w2a16g128,w1a16g128  # the served plans' (no w4a4)
SMALL="--attention-backend triton --sampling-backend pytorch --grammar-backend none --mem-fraction-static 0.9"

say() { echo "$(date +%T) $*" >> $res/status.txt; }
# whether moe_layer.py's bf16 Marlin MoE came prebuilt (.tvm-ffi-bf16.tar.xz, scripts/device_env.sh unpacks it)
marlin_bf16() { compgen -G "/tmp/tvmcache/*moe_wna16_marlin_bf16_t_*" > /dev/null; }

sglang_tests() {  # ARCH...: tests/test_sglang_gpu.py for each, side by side; K=EXPRESSION: only its tests (their logs
  # named K_ARCH)
  mkdir -p $res/tests
  for a in "$@"; do
    local n=${K:+${K}_}$a
    (MXSERVE_TEST_SGLANG_ARGS="$SMALL --max-total-tokens 16384" MXSERVE_TEST_SERVER_LOGS=$res/tests/servers_$n.log \
      python3 -m pytest -q -m gpu tests/test_sglang_gpu.py -k "${K:+$K and }$a" --basetemp=/tmp/pt_$n -rA \
      -p no:cacheprovider > $res/tests/$n.log 2>&1; say "tests ${K:+$K }$a rc=$? $(tail -1 $res/tests/$n.log)") &
  done
  wait
}

kernel_tests() {  # [-k EXPRESSION]: tests/test_kernels_gpu.py
  python3 -m pytest -q -m gpu tests/test_kernels_gpu.py ${1:+-k "$1"} --basetemp=/tmp/pt_k -rA -p no:cacheprovider
  say "kernel tests ${1:-all} rc=$?"
}

prep() {  # [ENV=VALUE...]: the 24-layer model and checkpoints, no serving (serving_runs.sh PREP_ONLY=1)
  env OMP_NUM_THREADS=8 PREP_ONLY=1 "$@" benchmarks/serving_runs.sh qwen15-24 $res/e2e > $res/prep.log 2>&1
  say "prep rc=$?"
}

prep_beside() {  # TESTS LOG PLAN_ENV...: the 24-layer checkpoints of that plan and the GPTQ copy, beside those kernel tests
  mkdir -p $res/tests
  prep MX_GPTQ=1 "${@:3}" &
  kernel_tests "$1" > $res/tests/$2 2>&1
  wait
  local name; name=$(printf '%s\n' "${@:3}" | sed -n 's/^NAME=//p')
  name=${name:-3.25bit}  # serving_runs.sh's name for the committed plan (thirty-second session: missed, no end to end)
  [ -f /tmp/w/q15-24-$name/config.json ] || { say "no 24-layer checkpoint $name (prep failed)"; return 1; }
}

# end to end: decode graphs to batch 32 and prefill graphs to 512 tokens, the most serving_runs.sh sends,
# for every server alike (the default captures to 256 and 8192: 55 s a server)
LEAN_ARGS="--attention-backend triton --sampling-backend pytorch --grammar-backend none --mem-fraction-static 0.6
  --cuda-graph-max-bs-decode 32 --cuda-graph-max-bs-prefill 512"

phase1() {
  mkdir -p $res/tests
  prep &
  kernel_tests slab > $res/tests/kernels_first.log 2>&1
  wait
  [ -f /tmp/w/q15-24-3.25bit/config.json ] || { say "no 24-layer checkpoint (prep failed)"; return 1; }
}

phase2() {
  [ -f /tmp/w/q15-24-3.25bit/config.json ] || { say "no 24-layer checkpoint: phase 1 first"; return 1; }
  benchmarks/serving_runs.sh qwen15-24 $res/e2e > $res/e2e.log 2>&1
  say "e2e rc=$?"
  pkill -f "[s]glang.launch_server"
  rm -rf /tmp/w  # the disk for the next phases
}

phase3() {
  # the tiers of plans/qwen15-24l-3.25bit.json (blocks: w3 1398, w2 918, w4 621, w8 126), most popular first;
  # the mixed layer also with its shared experts inside the routed launches, with zero points folded, and on
  # the Gluon CUDA-core kernel
  python3 benchmarks/moe_layer.py --models qwen1.5-moe-a2.7b --tokens 1 2 8 16 32 64 \
    --plan served=w8a16:1,w4a16g128:5,w3a16g128:11,w2a16g128:7 --layouts 'shared|zero folded|CUDA-core, Gluon' --out $res/served \
    > $res/served.log 2>&1
  say "moe_layer served tiers rc=$?"
}

phase4() {
  python3 benchmarks/moe_layer.py --models qwen1.5-moe-a2.7b --tokens 4096 8192 --out $res/prefill \
    > $res/prefill.log 2>&1
  say "moe_layer prefill rc=$?"
}

phase5() {
  python3 benchmarks/random_model.py --config benchmarks/configs/refmoe-25m.json --tokenizer $TOKENIZER --out /tmp/cm \
    > /dev/null 2>&1
  python3 benchmarks/cold_start.py --model /tmp/cm --plan benchmarks/plans/refmoe-3.25bit.json --out $res/cold \
    --warm-rounds 3 > $res/cold.log 2>&1
  say "cold start rc=$?"
}

phase6() {
  timeout 600 python3 -m mxserve.cli profile --models qwen1.5-moe-a2.7b deepseek-v2-lite \
    --out $res/kernel-profile.json > $res/profile.log 2>&1
  say "kernel profile rc=$?"
}

phase8() {
  # the seventh session's changes, when little device time is left: the shared experts on a second
  # stream at decode, the CUDA-core path's codes cut by shifts, the Gluon CUDA-core kernel (opt-in).
  # Their GPU tests (every layout at real shapes) beside the 24-layer checkpoint (no GPTQ copy); the
  # served tiers' layer as served, with the shared experts inside the routed launches, with zero
  # points folded and on the Gluon CUDA-core kernel, in one run; then mxserve's server alone end to
  # end, as it serves by default and with MXSERVE_GLUON_FMA=1 (its baselines from an earlier run)
  mkdir -p $res/tests
  prep MX_ONLY=1 &
  kernel_tests "second_stream or padded_slots or whole_layer_real or every_layout or all_schemes or gluon_fma" \
    > $res/tests/kernels_first.log 2>&1
  wait
  [ -f /tmp/w/q15-24-3.25bit/config.json ] || { say "no 24-layer checkpoint (prep failed)"; return 1; }
  python3 benchmarks/moe_layer.py --models qwen1.5-moe-a2.7b --tokens 1 8 --ours-only \
    --layouts 'shared|zero folded|CUDA-core, Gluon' --plan served=w8a16:1,w4a16g128:5,w3a16g128:11,w2a16g128:7 \
    --out $res/served > $res/served.log 2>&1
  say "moe_layer served tiers and this session's variants rc=$?"
  MX_ONLY=1 GLUON_FMA=1 benchmarks/serving_runs.sh qwen15-24 $res/e2e > $res/e2e.log 2>&1
  say "e2e mxserve alone, and with the Gluon CUDA-core kernel, rc=$?"
  pkill -f "[s]glang.launch_server"
}

phase9() {
  # issue 10 item 4 end to end: this GPU's kernel profile of Qwen1.5's shapes at decode (alone on the
  # GPU, beside the random model's writing), the 24-layer plan at 3.25 bits for 1-token forwards at
  # r = 0.75, 0.5 and 0.25 priced with it, and the r = 0.5 plan served, with SGLang fp8 in the same run
  mkdir -p $res/e2e $res/plans
  (python3 benchmarks/random_model.py --config benchmarks/configs/qwen1.5-moe-a2.7b.json --tokenizer $TOKENIZER \
     --out $WORK/qwen15 > $res/model.log 2>&1; say "random model rc=$?") &
  timeout 200 python3 -m mxserve.cli profile --models qwen1.5-moe-a2.7b --tokens 1 4 16 \
    --schemes $PLAN_SCHEMES --out $res/h200-kernel-profile-qwen15.json > $res/profile.log 2>&1
  say "kernel profile rc=$?"
  wait
  PYTHONPATH=.:$PYTHONPATH python3 benchmarks/synthetic_profile.py --config benchmarks/configs/qwen1.5-moe-a2.7b.json --layers 24 \
    --out $res/plans/synthetic-24l.json > $res/plans/plan.log 2>&1
  for r in 0.75 0.5 0.25; do
    python3 -m mxserve.cli plan --profile $res/plans/synthetic-24l.json --budget 3.25bit --r $r --tokens 1 \
      --schemes $PLAN_SCHEMES --kernel-profile $res/h200-kernel-profile-qwen15.json \
      --out $res/plans/qwen15-24l-3.25bit-r$r-t1.json >> $res/plans/plan.log 2>&1
  done
  say "plans rc=$?"
  [ -f $res/plans/qwen15-24l-3.25bit-r0.5-t1.json ] || return 1
  FP8_ONLY=1 PLAN=$res/plans/qwen15-24l-3.25bit-r0.5-t1.json NAME=3.25bit-r0.5-t1 \
    benchmarks/serving_runs.sh qwen15-24 $res/e2e > $res/e2e.log 2>&1
  say "e2e fp8 and the decode plan rc=$?"
  pkill -f "[s]glang.launch_server"
}

phase10() {
  # the Gluon CUDA-core kernel's packed bf16 arithmetic (MXSERVE_GLUON_FMA=packed, eighth session): its GPU
  # tests beside the 24-layer checkpoint; the layer at 1 and 2 tokens with it, one launch per GEMM and one
  # per group of codes (its 4-bit branch holds 82 registers, the served code set's 168); then served
  # beside the default and all of issue 10's baselines (SGLang bf16, fp8, the GPTQ copy on Marlin) in one run
  mkdir -p $res/tests
  prep &
  kernel_tests "gluon_fma or every_layout" > $res/tests/kernels_first.log 2>&1
  wait
  for d in single grouped; do
    MXSERVE_DISPATCH=$d python3 benchmarks/moe_layer.py --models qwen1.5-moe-a2.7b --tokens 1 2 --ours-only \
      --layouts 'CUDA-core, Gluon' --plan served=w8a16:1,w4a16g128:5,w3a16g128:11,w2a16g128:7 \
      --out $res/layer-$d > $res/layer-$d.log 2>&1
    say "moe_layer packed, dispatch $d rc=$?"
  done
  GLUON_FMA=packed benchmarks/serving_runs.sh qwen15-24 $res/e2e > $res/e2e.log 2>&1
  say "e2e bf16, fp8, GPTQ on Marlin, mxserve and mxserve packed rc=$?"
  pkill -f "[s]glang.launch_server"
}

phase11() {
  # what bounds the 1-token layer (ninth session): neither bytes (w1 = w2 = w4) nor instructions (packed:
  # a quarter fewer, same time) do. benchmarks/decode_waves.py counts more programs in a 1-token launch
  # than the SMs hold at once. The served tiers' layer and the 3.31-bit one with K split 1, 2, 4 and 6
  # ways and capped at 128 registers, and split by waves (MXSERVE_DECODE_SPLIT=waves), beside pick_tiles'
  # split and the packed kernel, in one run (~3 min)
  python3 benchmarks/moe_layer.py --models qwen1.5-moe-a2.7b --tokens 1 2 --ours-only \
    --layouts 'CUDA-core, (split|128|Gluon, packed)|waves' --plan served=w8a16:1,w4a16g128:5,w3a16g128:11,w2a16g128:7 \
    --out $res/waves > $res/waves.log 2>&1
  say "moe_layer split and register sweep rc=$?"
  # the tight capacity from 8 tokens on (the picked layout and split by waves, beside Marlin)
  python3 benchmarks/moe_layer.py --models qwen1.5-moe-a2.7b --tokens 8 16 64 --ours-only --layouts 'waves' \
    --plan served=w8a16:1,w4a16g128:5,w3a16g128:11,w2a16g128:7 --out $res/capacity > $res/capacity.log 2>&1
  say "moe_layer 8 to 64 tokens rc=$?"
  # then the GPU tests of the ninth session's changes (the alignment's tight capacity, K split by waves)
  mkdir -p $res/tests
  kernel_tests "all_schemes or every_layout or padded_slots or second_stream" > $res/tests/kernels_s9.log 2>&1
}

phase12() {
  # issue 10's end-to-end run in one call that stands alone (~9 min): the checkpoints (2 min), then SGLang fp8,
  # mxserve, mxserve with K split by waves and the GPTQ copy on Marlin (bf16 left out: measured at 345-347
  # tokens/s at concurrency 1 in four sessions, below fp8); every server with LEAN_ARGS
  prep
  NO_BF16=1 SPLIT=waves SGLANG_ARGS="$LEAN_ARGS" benchmarks/serving_runs.sh qwen15-24 $res/e2e > $res/e2e.log 2>&1
  say "e2e fp8, mxserve, mxserve split by waves, GPTQ on Marlin rc=$?"
  pkill -f "[s]glang.launch_server"
}

e2e_early() {  # [ENV=VALUE...]
  # after prep: mxserve, mxserve with the shared experts launched early (MXSERVE_SHARED_EARLY=1) and the GPTQ
  # copy on Marlin, end to end in one run (~8 min)
  [ -f /tmp/w/q15-24-3.25bit/config.json ] || { say "no 24-layer checkpoint (prep failed)"; return 1; }
  env NO_BF16=1 MX_GPTQ=1 EARLY=1 SGLANG_ARGS="$LEAN_ARGS" "$@" benchmarks/serving_runs.sh qwen15-24 $res/e2e \
    > $res/e2e.log 2>&1
  say "e2e mxserve, mxserve shared early, GPTQ on Marlin rc=$?"
  pkill -f "[s]glang.launch_server"
}

phase13() {
  # the tenth session's change (MXSERVE_SHARED_EARLY=1: the shared experts launch as their MoE block starts,
  # beside the router; the traces showed them waiting behind it): its GPU tests (the kernels' case, then
  # SGLang serving the same text with it on Qwen2-MoE and DeepSeek-V2; ~5 min), then end to end in one run
  # against the default and the GPTQ copy on Marlin (checkpoints 2.5 min, three servers ~8 min: two calls)
  mkdir -p $res/tests
  prep &
  kernel_tests "second_stream" > $res/tests/kernels_s10.log 2>&1
  # the tests' own SGLang arguments (a static memory fraction of 0.3): the checkpoints' writing holds GPU memory too
  python3 -m pytest -q -m gpu tests/test_sglang_gpu.py -k launched_early --basetemp=/tmp/pt_e -rA -p no:cacheprovider \
    > $res/tests/sglang_early.log 2>&1
  say "sglang early tests rc=$?"
  wait
  e2e_early
}

phase14() {
  # what bounds the layer at 8 tokens (tenth session's traces: our Gluon gate/up moves about 1.7 TB/s of
  # codes, Marlin's 2.8): ncu on the four Gluon launches of one forward of the served tiers, then on
  # Marlin's two MoE launches at 8 tokens (~3 min)
  mkdir -p $res/tests
  command -v ncu > /dev/null || { say "no ncu on this image"; return 1; }
  local sections="--section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy
    --section LaunchStats --section SchedulerStats"
  # shellcheck disable=SC2086
  ncu --kernel-name regex:mx_moe_gemm_gluon --launch-skip 12 --launch-count 4 $sections python3 benchmarks/profile_layer.py \
    --tokens 8 --plan served=w8a16:1,w4a16g128:5,w3a16g128:11,w2a16g128:7 --loop > $res/ncu-gluon-8tok.txt 2>&1
  say "ncu of the Gluon launches rc=$?"
  # shellcheck disable=SC2086
  ncu --kernel-name-base demangled --kernel-name regex:marlin_moe --launch-skip 20 --launch-count 2 $sections \
    python3 benchmarks/moe_layer.py --models qwen1.5-moe-a2.7b --tokens 8 --ours-only --layouts '^$' --out /tmp/ncu_ml \
    > $res/ncu-marlin-8tok.txt 2>&1
  say "ncu of Marlin's launches rc=$?"
  # the Gluon kernel's padding slots loading no activations (tenth session, opt-in): its GPU test, then timed
  # beside the picked layout at 2 to 16 tokens
  kernel_tests "gluon_kernel_real_shapes" > $res/tests/kernels_skip_pad.log 2>&1
  python3 benchmarks/moe_layer.py --models qwen1.5-moe-a2.7b --tokens 2 8 16 --ours-only --layouts 'padding' \
    --plan served=w8a16:1,w4a16g128:5,w3a16g128:11,w2a16g128:7 --out $res/skip_pad > $res/skip_pad.log 2>&1
  say "moe_layer, padding not loaded rc=$?"
}

phase15() {
  # the eleventh session's open ends, in the order they matter (~26 min):
  # (0) beside the checkpoints (untimed), the GPU tests of its kernel changes: the fp8 accumulator in the
  #     wgmma, and prefill tiles with the weights as the A operand (every layout, swapped-prefill included);
  # (1) end to end with a warm-up wave and three timed rounds per concurrency (serving.py --rounds; phase
  #     13's single round had the early launch at 0.64x at 8 requests while its traced decode steps ran 2%
  #     faster), the GPTQ copy also with --enable-metrics (mxserve launch always passes it; at 1 request the
  #     traced GPU forward is equal and the host time between steps is not);
  # (2) prefill at 4096 and 8192 tokens against every baseline (phase 4): the fp8 GEMM with its accumulator
  #     in the wgmma (the committed tiles, tuned for the old code), the weight-only layers also with their
  #     weights as the wgmma's A operand (moe_layer.PREFILL_VARIANTS);
  # (3) cold start, where a warm launch now spawns no compilers and the launcher makes no CUDA context
  mkdir -p $res/tests
  prep &
  kernel_tests "all_schemes or every_layout" > $res/tests/kernels_s11.log 2>&1
  wait
  e2e_early METRICS=1
  phase4
  phase5
}

phase16() {
  # (1) the fp8 prefill tiles re-tuned for the fused accumulation (the table's were chosen for the old code;
  #     a candidate must beat the table's pick by 3%): a table to commit, the committed one left in place;
  # (2) ncu with every section and source-level stalls on the routed gate/up launch at 8 tokens (phase 14:
  #     SMs active 42% of its time; which instructions wait)
  mkdir -p $res/tiles
  python3 benchmarks/tune_tiles.py --models qwen1.5-moe-a2.7b --classes fp8 --tokens 4096 8192 \
    --out $res/tiles/nvidia-h200.json > $res/tiles.log 2>&1
  say "fp8 tiles re-tuned rc=$?"
  command -v ncu > /dev/null || { say "no ncu on this image"; return 1; }
  ncu --set full --import-source yes --metrics sm__cycles_active.min,sm__cycles_active.max,sm__cycles_active.avg \
    --kernel-name regex:mx_moe_gemm_gluon --launch-skip 14 --launch-count 1 -o $res/ncu-gluon-8tok-full \
    python3 benchmarks/profile_layer.py --tokens 8 --plan served=w8a16:1,w4a16g128:5,w3a16g128:11,w2a16g128:7 \
    --loop > $res/ncu-full.log 2>&1
  ncu --import $res/ncu-gluon-8tok-full.ncu-rep --page details --print-details all > $res/ncu-gluon-8tok-full.txt 2>&1
  ncu --import $res/ncu-gluon-8tok-full.ncu-rep --page source --csv --print-source sass \
    > $res/ncu-gluon-8tok-source.csv 2>&1
  say "ncu full rc=$?"
}

phase17() {
  mkdir -p $res/tests
  kernel_tests "all_schemes or every_layout" > $res/tests/kernels_s11.log 2>&1
}

phase18() {
  # the twelfth session's open ends (~22 min): (0) beside the checkpoints (untimed), the GPU tests of the fused
  # per-token quantization (mxkernels/act_quant.py, bit for bit against torch's ops; every scheme's GEMMs, fp8
  # included, take it) and of the Gluon kernel's program order (split and block variants); (1) prefill at 4096
  # and 8192 tokens against every baseline: fp8 with the fused quantization and the re-tuned tiles (the torch
  # ops took 508 of 1500 us at 4096 tokens) and the many-program alignment, the weight-only layers also with
  # their tiles dequantized K-major (moe_layer.PREFILL_VARIANTS); the decode layer with K split by
  # each expert's bits; (2) end to end in three timed rounds (the Gluon kernel's new order took the served
  # tiers' layer from 71 to 58 us at 8 tokens); (3) cold start
  mkdir -p $res/tests
  prep &
  python3 -m pytest -q -m gpu tests/test_act_quant.py tests/test_kernels_gpu.py --basetemp=/tmp/pt_k -rA \
    -k "row_quant or all_schemes or gluon_kernel_real_shapes or whole_layer or (every_layout and kmajor)" -p no:cacheprovider > $res/tests/kernels_s12.log 2>&1
  say "kernel tests s12 rc=$?"
  wait
  phase4
  # the Gluon kernel's K split by each expert's bits (Tiles.split_bits), beside the picked layout and Marlin
  python3 benchmarks/moe_layer.py --models qwen1.5-moe-a2.7b --tokens 8 16 64 --layouts 'split by bits' \
    --plan served=w8a16:1,w4a16g128:5,w3a16g128:11,w2a16g128:7 --out $res/split_bits > $res/split_bits.log 2>&1
  say "moe_layer K split by bits rc=$?"
  e2e_early METRICS=1
  phase5
}

phase19() {
  # phase 18's kernel half as one call that stands alone (~8 min; a machine can be given back between calls):
  # the GPU tests of the twelfth session's kernels, prefill with the fused quantization and K-major tiles, the
  # decode layer with K split by each expert's bits
  mkdir -p $res/tests
  python3 -m pytest -q -m gpu tests/test_act_quant.py tests/test_kernels_gpu.py --basetemp=/tmp/pt_k -rA \
    -k "row_quant or all_schemes or gluon_kernel_real_shapes or whole_layer or (every_layout and kmajor)" -p no:cacheprovider > $res/tests/kernels_s12.log 2>&1
  say "kernel tests s12 rc=$?"
  phase4
  python3 benchmarks/moe_layer.py --models qwen1.5-moe-a2.7b --tokens 8 16 64 --layouts 'split by bits' \
    --plan served=w8a16:1,w4a16g128:5,w3a16g128:11,w2a16g128:7 --out $res/split_bits > $res/split_bits.log 2>&1
  say "moe_layer K split by bits rc=$?"
}

phase20() {
  # end to end as one call that stands alone (~9 min): the checkpoints, then mxserve and the GPTQ copy on
  # Marlin with --enable-metrics (as mxserve launch runs SGLang), three timed rounds each. On 2026-12-04 the
  # GPTQ server was still capturing its first CUDA graph when serving.py's 420 s ran out: SGLang builds its
  # fp16 elementwise modules with nvcc on first use (scripts/marlin_cache.sh now prebuilds the two seen).
  # So its start may take 900 s, and the JIT caches are listed before and after: what still builds shows.
  prep MX_GPTQ=1
  [ -f /tmp/w/q15-24-3.25bit/config.json ] || { say "no 24-layer checkpoint (prep failed)"; return 1; }
  ls /tmp/tvmcache ~/.cache/flashinfer/*/*/cached_ops > $res/jit_before.txt 2>&1
  # what runs while the servers start (nvcc builds, servers left over), every 15 s
  (while :; do date +%T; ps -eo etime,pcpu,args | grep -E "[n]vcc|[c]icc|[n]inja|[s]glang|[m]xserve" | cut -c1-160
     sleep 15; done > $res/ps.txt 2>&1) &
  local mon=$!
  MX_GPTQ=1 METRICS_ONLY=1 STARTUP_TIMEOUT=900 SGLANG_ARGS="$LEAN_ARGS" benchmarks/serving_runs.sh qwen15-24 $res/e2e \
    > $res/e2e.log 2>&1
  say "e2e mxserve, GPTQ on Marlin with metrics rc=$?"
  kill $mon
  ls /tmp/tvmcache ~/.cache/flashinfer/*/*/cached_ops > $res/jit_after.txt 2>&1
  pkill -f "[s]glang.launch_server"
}

phase21() {
  # prefill on DeepSeek-V2-Lite's shape, whose four cells missed by 0.4 to 2% (thirteenth session), with every
  # variant timed in three rounds, the order rotated (moe_layer.py --rounds): medians, not first-timed samples
  python3 benchmarks/moe_layer.py --models deepseek-v2-lite --tokens 4096 8192 --rounds 3 --out $res/prefill_dsv2 \
    > $res/prefill_dsv2.log 2>&1
  say "moe_layer DeepSeek-V2-Lite prefill, 3 rounds rc=$?"
}

phase22() {
  # the sixteenth session's decode kernel (~10 min): the arena's codes in pairs (k, k + 1) and the K loop
  # carrying whole registers (the w4 gate/up loop 275 -> 236 instructions, sm_90 SASS). Its GPU tests first
  # (every layout reads the repacked codes), then the decode layer beside Marlin on every model shape
  mkdir -p $res/tests
  kernel_tests "gluon or all_schemes or whole_layer or dequant or every_layout or second_stream" \
    > $res/tests/kernels_s16.log 2>&1
  python3 benchmarks/moe_layer.py --tokens 16 64 --out $res/layer_s16 > $res/layer_s16.log 2>&1
  say "moe_layer decode 16 64 rc=$?"
  python3 benchmarks/moe_layer.py --tokens 1 --out $res/layer_s16_1tok > $res/layer_s16_1tok.log 2>&1
  say "moe_layer decode 1 rc=$?"
}

phase23() {
  # what bounds the decode layer at the issue's sizes with the sixteenth session's kernel (~8 min): the launch
  # count test fixed for the shared experts' own launches; each kernel's device time at 16 and 64 tokens
  # (torch profiler); ncu on our four Gluon launches and Marlin's two at 16 and 64 tokens (the eleventh
  # session's were at 8), then on Mixtral's 1-token launches, where ours run 0.84x Marlin
  mkdir -p $res/tests $res/ncu
  kernel_tests "gluon_kernel_by_default" > $res/tests/kernels_s17.log 2>&1
  for t in 16 64; do
    python3 benchmarks/profile_layer.py --tokens $t > $res/ncu/kernels-qwen15-${t}tok.txt 2>&1
  done
  say "kernel times rc=$?"
  command -v ncu > /dev/null || { say "no ncu on this image"; return 1; }
  local sections="--section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy
    --section LaunchStats --metrics sm__cycles_active.min,sm__cycles_active.avg,sm__cycles_active.max"
  local m
  for t in 16 64; do
    # a forward's launches, twice at 16 tokens (stream-K: gate/up and down, the shared experts inside), once at 64 (the
    # shared experts' launches apart)
    # shellcheck disable=SC2086
    ncu --kernel-name regex:mx_moe_gemm_gluon --launch-skip 12 --launch-count 4 $sections \
      python3 benchmarks/profile_layer.py --tokens $t --loop > $res/ncu/ncu-ours-qwen15-${t}tok.txt 2>&1
    say "ncu ours $t tokens rc=$?"
    # shellcheck disable=SC2086
    ncu --kernel-name-base demangled --kernel-name regex:marlin_moe --launch-skip 20 --launch-count 2 $sections \
      python3 benchmarks/moe_layer.py --models qwen1.5-moe-a2.7b --tokens $t --ours-only --layouts '^$' \
      --out /tmp/ncu_ml > $res/ncu/ncu-marlin-qwen15-${t}tok.txt 2>&1
    say "ncu marlin $t tokens rc=$?"
  done
  m=mixtral-8x7b
  # shellcheck disable=SC2086
  ncu --kernel-name regex:mx_moe_gemm --launch-skip 6 --launch-count 2 $sections \
    python3 benchmarks/profile_layer.py --model $m --tokens 1 --loop > $res/ncu/ncu-ours-$m-1tok.txt 2>&1
  # shellcheck disable=SC2086
  ncu --kernel-name-base demangled --kernel-name regex:marlin_moe --launch-skip 20 --launch-count 2 $sections \
    python3 benchmarks/moe_layer.py --models $m --tokens 1 --ours-only --layouts '^$' \
    --out /tmp/ncu_ml > $res/ncu/ncu-marlin-$m-1tok.txt 2>&1
  say "ncu $m 1 token rc=$?"
}

phase24() {
  # the seventeenth session's kernel changes (~8 min): the stream-K Gluon kernel (opt-in) and the K loop's group
  # index without a division (every Gluon decode launch). The GPU tests of both first (if the default layouts'
  # fail, revert the division change before serving), then the decode layer at 1, 8, 16 and 64 tokens beside
  # the picked layout and Marlin on every model shape
  mkdir -p $res/tests
  kernel_tests "stream_k or gluon_kernel_real_shapes or gluon_kernel_by_default or second_stream" \
    > $res/tests/kernels_s17_stream_k.log 2>&1
  python3 benchmarks/moe_layer.py --tokens 1 8 16 64 --ours-only --layouts 'stream-K|^Gluon, BM 8$' \
    --out $res/layer_stream_k > $res/layer_stream_k.log 2>&1
  say "moe_layer stream-K rc=$?"
  # ncu on its two launches (one per GEMM, the shared experts inside) at 16 and 64 tokens, as phase 23 took the
  # default's: whether every SM now works to the end, and at what DRAM throughput
  command -v ncu > /dev/null || { say "no ncu on this image"; return 1; }
  local t sections="--section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy
    --section LaunchStats --metrics sm__cycles_active.min,sm__cycles_active.avg,sm__cycles_active.max"
  mkdir -p $res/ncu
  for t in 16 64; do
    # a forward's launches, twice at 16 tokens (stream-K: gate/up and down, the shared experts inside), once at 64 (the
    # shared experts' launches apart)
    # shellcheck disable=SC2086
    MXSERVE_STREAM_K=1 ncu --kernel-name regex:mx_moe_gemm_gluon --launch-skip 6 --launch-count 2 $sections \
      python3 benchmarks/profile_layer.py --tokens $t --loop > $res/ncu/ncu-stream-k-qwen15-${t}tok.txt 2>&1
    say "ncu stream-K $t tokens rc=$?"
  done
}

phase25() {
  # end to end: the default (stream-K below 4 rows per expert since the eighteenth session) beside the unbalanced
  # grid (MXSERVE_STREAM_K=0) and the GPTQ copy on Marlin, after stream-K's SGLang GPU tests; the checkpoints
  # first (~14 min: two calls)
  mkdir -p $res/tests
  prep &
  python3 -m pytest -q -m gpu tests/test_sglang_gpu.py -k stream_k --basetemp=/tmp/pt_sk -rA -p no:cacheprovider \
    > $res/tests/sglang_stream_k.log 2>&1
  say "sglang stream-K tests rc=$?"
  wait
  [ -f /tmp/w/q15-24-3.25bit/config.json ] || { say "no 24-layer checkpoint (prep failed)"; return 1; }
  env NO_BF16=1 MX_GPTQ=1 STREAM_K=0 SGLANG_ARGS="$LEAN_ARGS" benchmarks/serving_runs.sh qwen15-24 $res/e2e_stream_k \
    > $res/e2e_stream_k.log 2>&1
  say "e2e mxserve, mxserve without stream-K, GPTQ on Marlin rc=$?"
  pkill -f "[s]glang.launch_server"
}

phase26() {
  mkdir -p $res/tests
  python3 benchmarks/moe_layer.py --tokens 1 8 16 64 --ours-only --layouts 'stream-K' --out $res/layer_s18 \
    > $res/layer_s18.log 2>&1
  say "moe_layer stream-K picked rc=$?"
  kernel_tests "stream_k or gluon_kernel_by_default or padded_slots or second_stream" \
    > $res/tests/kernels_s18_stream_k.log 2>&1
  python3 -m pytest -q -m gpu tests/test_sglang_gpu.py -k "stream_k and qwen2_moe" --basetemp=/tmp/pt_sk -rA \
    -p no:cacheprovider > $res/tests/sglang_stream_k.log 2>&1
  say "sglang stream-K test rc=$?"
}

phase28() {
  mkdir -p $res/tests
  kernel_tests "counts_routing or gluon_kernel or stream_k or second_stream" > $res/tests/kernels_s19.log 2>&1
  python3 benchmarks/moe_layer.py --models qwen1.5-moe-a2.7b --tokens 1 8 16 32 --ours-only --layouts 'stream-K' \
    --plan served=w8a16:1,w4a16g128:5,w3a16g128:11,w2a16g128:7 --out $res/layer_served > $res/layer_served.log 2>&1
  say "moe_layer served tiers, stream-K rc=$?"
}

phase29() {
  # issue 10 item 4 end to end. The eighth session's profile: an expert takes the same time in w1, w2 and w4
  # at decode, 1.6x in w3; the served plan (r = 1, accuracy alone) is 43% w3
  mkdir -p $res/plans
  prep &
  timeout 300 python3 -m mxserve.cli profile --models qwen1.5-moe-a2.7b --tokens 1 8 32 --schemes $PLAN_SCHEMES \
    --out $res/h200-kernel-profile-qwen15-s20.json > $res/profile.log 2>&1
  say "kernel profile rc=$?"
  wait
  [ -f /tmp/w/q15-24-3.25bit/config.json ] || { say "no 24-layer checkpoint (prep failed)"; return 1; }
  PYTHONPATH=.:$PYTHONPATH python3 benchmarks/synthetic_profile.py --config benchmarks/configs/qwen1.5-moe-a2.7b.json \
    --layers 24 --out $res/plans/synthetic-24l.json > $res/plans/plan.log 2>&1
  python3 -m mxserve.cli plan --profile $res/plans/synthetic-24l.json --budget 3.25bit --r 0.25 --tokens 8 \
    --schemes $PLAN_SCHEMES --kernel-profile $res/h200-kernel-profile-qwen15-s20.json \
    --out $res/plans/qwen15-24l-3.25bit-r0.25-t8.json >> $res/plans/plan.log 2>&1
  say "plan rc=$?"
  [ -f $res/plans/qwen15-24l-3.25bit-r0.25-t8.json ] || return 1
  env NO_BF16=1 MX_GPTQ=1 ALSO_PLAN=$res/plans/qwen15-24l-3.25bit-r0.25-t8.json:3.25bit-r0.25-t8 \
    SGLANG_ARGS="$LEAN_ARGS" benchmarks/serving_runs.sh qwen15-24 $res/e2e_r > $res/e2e_r.log 2>&1
  say "e2e mxserve at r = 1 and r = 0.25, GPTQ on Marlin rc=$?"
  pkill -f "[s]glang.launch_server"
}

phase30() {
  # the twentieth session's two rules, end to end: stream-K below 1.5 rows per expert for layers with 3 or 8-bit
  # codes (the served tiers' layer ran slower on it from 8 tokens, phase 28; the rule since looks at the share of
  # those codes, which keeps stream-K for this plan), and plans priced for decode at r < 1 without
  # the schemes the decode kernel does not run (phase 29's r = 0.25 plan held w8a8fp8 in 4 of 24 layers, whose
  # GEMMs then ran on the Triton kernel: 754 of a 3412 us step). The r = 0.25 plan of phase 29's profile,
  # made again so, beside the GPTQ copy on Marlin (about 9 minutes with the checkpoints)
  local plan=(PLAN=benchmarks/plans/qwen15-24l-3.25bit-r0.25-t8.json NAME=3.25bit-r0.25-t8)
  prep MX_GPTQ=1 "${plan[@]}"
  env NO_BF16=1 MX_GPTQ=1 "${plan[@]}" SGLANG_ARGS="$LEAN_ARGS" benchmarks/serving_runs.sh qwen15-24 $res/e2e_s20 \
    > $res/e2e_s20.log 2>&1
  say "e2e mxserve r = 0.25 (no fp8, stream-K off for 3 or 8-bit codes), GPTQ on Marlin rc=$?"
  pkill -f "[s]glang.launch_server"
  return 0
}

phase31() {
  # the stream-K rule as it stands (off from 1.5 rows per expert only where more than a quarter of a layer's
  # weights are 3 or 8-bit or bf16): the committed plan (46%: off at 8 requests) and the r = 0.25 plan (5%: on)
  # beside the GPTQ copy on Marlin, one run (~14 min with the checkpoints); then the layer at costly shares
  # between the two (~2 min). Every kernel GPU test moved to phase 33.
  local plan=(ALSO_PLAN=benchmarks/plans/qwen15-24l-3.25bit-r0.25-t8.json:3.25bit-r0.25-t8)
  prep MX_GPTQ=1 "${plan[@]}"
  env NO_BF16=1 MX_GPTQ=1 "${plan[@]}" SGLANG_ARGS="$LEAN_ARGS" benchmarks/serving_runs.sh qwen15-24 $res/e2e_s21 \
    > $res/e2e_s21.log 2>&1
  say "e2e mxserve r = 1 and r = 0.25, GPTQ on Marlin rc=$?"
  pkill -f "[s]glang.launch_server"
  # where the bound lies: the layer with an eighth and a quarter of its tiers 3 or 8-bit, stream-K beside the
  # unbalanced grid (the measured ends: 5% and 46-50%)
  python3 benchmarks/moe_layer.py --models qwen1.5-moe-a2.7b --tokens 1 8 16 --ours-only --layouts 'stream-K' \
    --plan eighth=w8a16:1,w4a16g128:10,w3a16g128:2,w2a16g128:11 --plan quarter=w8a16:1,w4a16g128:9,w3a16g128:5,w2a16g128:9 \
    --out $res/layer_costly > $res/layer_costly.log 2>&1
  say "moe_layer costly shares rc=$?"
  return 0
}

phase32() {
  # the twenty-first session's stream-K deal, runs of equal cost by the tiles' codes (moe.STREAM_K_TILE_COSTS; the
  # layer with an eighth of its tiers 3 or 8-bit took 1.19x the unbalanced grid's time on the even deal at 16
  # tokens, phase 31): stream-K's GPU tests beside the checkpoints, then the layer at 1, 8 and 16 tokens (the
  # served plan's tiers, an eighth and a quarter costly) on both deals beside the unbalanced grid, then end to end
  # the committed plan (46% costly: off from 1.5 rows per expert) also with stream-K forced, the r = 0.25 plan and
  # the GPTQ copy on Marlin (~15 min: two calls). Ran at commit f72222b; the deal by cost and its layout "stream-K,
  # even deal" were removed after it (benchmarks/README.md, twenty-first session)
  local plan=(ALSO_PLAN=benchmarks/plans/qwen15-24l-3.25bit-r0.25-t8.json:3.25bit-r0.25-t8)
  mkdir -p $res/tests
  prep MX_GPTQ=1 "${plan[@]}" &
  kernel_tests stream_k > $res/tests/kernels_stream_k.log 2>&1
  wait
  python3 benchmarks/moe_layer.py --models qwen1.5-moe-a2.7b --tokens 1 8 16 --ours-only \
    --layouts '^(Gluon, stream-K|no stream-K|stream-K, even deal)$' --plan served=w8a16:1,w4a16g128:5,w3a16g128:11,w2a16g128:7 \
    --plan eighth=w8a16:1,w4a16g128:10,w3a16g128:2,w2a16g128:11 --plan quarter=w8a16:1,w4a16g128:9,w3a16g128:5,w2a16g128:9 \
    --out $res/layer_deal > $res/layer_deal.log 2>&1
  say "moe_layer stream-K deals rc=$?"
  [ -f /tmp/w/q15-24-3.25bit/config.json ] || { say "no 24-layer checkpoint (prep failed)"; return 1; }
  env NO_BF16=1 MX_GPTQ=1 STREAM_K=1 "${plan[@]}" SGLANG_ARGS="$LEAN_ARGS" benchmarks/serving_runs.sh qwen15-24 \
    $res/e2e_deal > $res/e2e_deal.log 2>&1
  say "e2e mxserve r = 1 (and stream-K forced), r = 0.25, GPTQ on Marlin rc=$?"
  pkill -f "[s]glang.launch_server"
}

phase33() {
  # the twenty-first session's two changes to the 15 to 17 us a layer spends before its GEMMs at decode: the shared
  # experts started early on the stream-K grid (MXSERVE_SHARED_EARLY=1: their own stream-K launches beside the
  # router, top-k and alignment; at 1 token half the weights read are theirs) and the router in one launch
  # (MXSERVE_FUSED_ROUTER=1: logits, softmax and top-k). Their kernel tests beside the checkpoints; end to end the
  # r = 0.25 plan alone, with each, with both, and the GPTQ copy on Marlin (~12 min); their SGLang tests (~5 min);
  # then every kernel GPU test (~13 min, a later call: the file has not run whole since stream-K became the default)
  local plan=(PLAN=benchmarks/plans/qwen15-24l-3.25bit-r0.25-t8.json NAME=3.25bit-r0.25-t8)
  prep_beside "fused_router or started_early" kernels_router.log "${plan[@]}" || return 1
  env NO_BF16=1 MX_GPTQ=1 EARLY=1 ROUTER=1 "${plan[@]}" SGLANG_ARGS="$LEAN_ARGS" benchmarks/serving_runs.sh qwen15-24 \
    $res/e2e_early > $res/e2e_early.log 2>&1
  say "e2e mxserve r = 0.25 alone, with the early shared launch, the fused router, both; GPTQ on Marlin rc=$?"
  pkill -f "[s]glang.launch_server"
  # why costly layers lose on stream-K (phases 31, 32): the tiles' width (BN 64 for them, 128 for narrow sets)?
  python3 benchmarks/moe_layer.py --models qwen1.5-moe-a2.7b --tokens 1 8 16 --ours-only \
    --layouts '^(Gluon, stream-K|no stream-K|stream-K, BN 64|stream-K, BN 128)$' \
    --plan eighth=w8a16:1,w4a16g128:10,w3a16g128:2,w2a16g128:11 --out $res/layer_bn > $res/layer_bn.log 2>&1
  say "moe_layer stream-K by tile width rc=$?"
  MXSERVE_TEST_SGLANG_ARGS="$SMALL --max-total-tokens 16384" python3 -m pytest -q -m gpu tests/test_sglang_gpu.py \
    -k "launched_early or fused_router" --basetemp=/tmp/pt_early -rA -p no:cacheprovider > $res/tests/sglang_early.log 2>&1
  say "sglang early-launch and fused-router tests rc=$? $(tail -1 $res/tests/sglang_early.log)"
  kernel_tests > $res/tests/kernels_all.log 2>&1
}

phase34() {
  # phase 33 again, cut to what its one call left out: the fused router's kernel tests (their two test faults
  # fixed: equal bf16 logits, the counters' device key) and its SGLang test beside the checkpoints; then end to
  # end the r = 0.25 plan with the fused router against the GPTQ copy on Marlin, in one run (phase 33 timed the
  # plan alone and with it: 464 and 485 tokens/s at 1 request, 2549 and 2614 at 8)
  local plan=(PLAN=benchmarks/plans/qwen15-24l-3.25bit-r0.25-t8.json NAME=3.25bit-r0.25-t8)
  mkdir -p $res/tests
  prep MX_GPTQ=1 "${plan[@]}" &
  kernel_tests fused_router > $res/tests/kernels_router.log 2>&1
  MXSERVE_TEST_SGLANG_ARGS="$SMALL --max-total-tokens 16384" python3 -m pytest -q -m gpu tests/test_sglang_gpu.py \
    -k fused_router --basetemp=/tmp/pt_router -rA -p no:cacheprovider > $res/tests/sglang_router.log 2>&1
  say "sglang fused-router test rc=$? $(tail -1 $res/tests/sglang_router.log)"
  wait
  [ -f /tmp/w/q15-24-3.25bit-r0.25-t8/config.json ] || { say "no 24-layer checkpoint (prep failed)"; return 1; }
  env NO_PLAIN=1 NO_BF16=1 MX_GPTQ=1 ROUTER=1 "${plan[@]}" SGLANG_ARGS="$LEAN_ARGS" \
    benchmarks/serving_runs.sh qwen15-24 $res/e2e_router > $res/e2e_router.log 2>&1
  say "e2e mxserve r = 0.25 with the fused router; GPTQ on Marlin rc=$?"
}

phase35() {
  # the twenty-second and twenty-third sessions' untimed changes: programmatic dependent launch of the decode MoE
  # chain (MXSERVE_PDL=1: router, alignment, gate/up, SiLU, down, top-k sum; the router's gate and the down GEMM's
  # first K tile loaded before their waits), the router's layouts (several experts a program, or all with no
  # counter), and fewer launches a layer: the router's launch laying out the rows and zeroing stream-K's sums
  # (MXSERVE_ROUTER_ALIGN=1, no alignment launch) and stream-K's gate/up launch taking the SiLU (MXSERVE_SILU_IN_GEMM=1,
  # no SiLU launch), and the GEMMs' L2 prefetch of each pair's K run (MXSERVE_L2_PREFETCH=1). Their kernel tests
  # beside the checkpoints; the router's launch timed by layout, with and without PDL, alone and laying out the
  # rows, against SGLang's (~1 min, after the checkpoints: they quantize on the GPU); the layer at 1, 8 and 16 tokens
  # in each mode, and on stream-K at both tile widths (phase 33's step that never ran: whether costly layers lose on
  # stream-K for their narrower tiles) (~3 min); then end to end the r = 0.25 plan (the fused router now the
  # default) alone, with PDL, with fewer launches, with all of them, and the GPTQ copy on Marlin (~11 min)
  local plan=(PLAN=benchmarks/plans/qwen15-24l-3.25bit-r0.25-t8.json NAME=3.25bit-r0.25-t8)
  prep_beside "fused_router or programmatic or lays_out or laying_out or silu or l2_prefetch or top_k_sum or more_programs" \
    kernels_pdl.log \
    "${plan[@]}" || return 1
  python3 benchmarks/router.py --out $res/router > $res/router.log 2>&1
  say "router launch by layout rc=$? $(tail -1 $res/router.log)"
  python3 benchmarks/moe_layer.py --models qwen1.5-moe-a2.7b --tokens 1 8 16 --ours-only \
    --layouts '^(Gluon, stream-K|no stream-K|stream-K, BN (64|128)|PDL|stream-K, SiLU (and top-k sum )?in the GEMM|stream-K, L2 prefetch( ahead| ahead, SiLU (and top-k sum )?in the GEMM, PDL)?|stream-K, down .*)$' \
    --plan eighth=w8a16:1,w4a16g128:10,w3a16g128:2,w2a16g128:11 --out $res/layer_pdl > $res/layer_pdl.log 2>&1
  say "moe_layer with PDL, the SiLU and top-k sum in the GEMMs, the L2 prefetch, stream-K by tile width and programs an SM rc=$?"
  env NO_BF16=1 MX_GPTQ=1 PDL=1 FEWER=1 ALL=1 "${plan[@]}" SGLANG_ARGS="$LEAN_ARGS" \
    benchmarks/serving_runs.sh qwen15-24 $res/e2e_pdl > $res/e2e_pdl.log 2>&1
  say "e2e mxserve r = 0.25 (fused router), with PDL, with fewer launches, with all and the L2 prefetch; GPTQ rc=$?"
  pkill -f "[s]glang.launch_server"
}

phase36_sglang() {
  # the fused router, the default since the twenty-second session, served by the other architectures' SGLang tests
  # (Qwen3-MoE, OLMoE, Mixtral; DeepSeek-V2 keeps SGLang's router), PDL's and the laid-out rows' SGLang tests
  mkdir -p $res/tests
  (MXSERVE_TEST_SGLANG_ARGS="$SMALL --max-total-tokens 16384" python3 -m pytest -q -m gpu tests/test_sglang_gpu.py \
    -k "programmatic or laying_out or top_k_sum" --basetemp=/tmp/pt_pdl -rA -p no:cacheprovider > $res/tests/sglang_pdl.log 2>&1
   say "sglang PDL and laid-out rows tests rc=$? $(tail -1 $res/tests/sglang_pdl.log)") &
  sglang_tests qwen3_moe olmoe mixtral
  wait
}

phase36() {
  phase36_sglang
  kernel_tests > $res/tests/kernels_all.log 2>&1
}

phase37() {
  # the twenty-fourth session's prefill changes, for the fp8 cell that misses by 0.4% (DeepSeek-V2-Lite, 4096 tokens,
  # uniform: 924 against SGLang's 837 us) and the layer's prefill in general: the launch takes a block's programs
  # one N tile at a time, after every other block's, so the down GEMM's input (46 MB in fp8 at 4096 tokens, 92 in
  # bf16) is read once per N tile from past L2 (Tiles.group_m: 8 or 16 blocks at a time, as SGLang's GROUP_SIZE_M);
  # and the down GEMM's per-token maxima taken by gate/up's launches, its fp8 rows quantized as loaded (no pass over
  # the intermediate). Their kernel tests; the layer beside every baseline; the fp8 tiles tuned over group_m and BN
  # 256 (SGLang's H200 fp8 tiles at these sizes: 128 x 256 x 128, 8 warps, 4 stages, GROUP_SIZE_M 16)
  mkdir -p $res/tests $res/tiles
  kernel_tests "grouped_order or prefill-grouped" > $res/tests/kernels_grouped.log 2>&1
  python3 benchmarks/moe_layer.py --models deepseek-v2-lite --tokens 4096 8192 --rounds 2 --out $res/prefill_grouped \
    > $res/prefill_grouped.log 2>&1
  say "moe_layer DeepSeek-V2-Lite prefill, grouped blocks and row maxima in gate/up, 2 rounds rc=$?"
  # where the fp8 layer's time goes, launch by launch (gate/up and down apart): the launch order, 8 blocks at a time
  # (both GEMMs, the down GEMM alone), with the row maxima in gate/up (alone, 8 at a time); then the mixed layer
  # (dequantized first) in the launch order and 8 at a time
  local prof=(python3 benchmarks/profile_layer.py --model deepseek-v2-lite --tokens 4096 --uniform --launches)
  {
    "${prof[@]}" --scheme w8a8fp8
    "${prof[@]}" --scheme w8a8fp8 --set group_m=8
    "${prof[@]}" --scheme w8a8fp8 --set down_tiles.group_m=8
    "${prof[@]}"
    "${prof[@]}" --set group_m=8
  } > $res/profile_prefill_grouped.txt 2>&1
  say "profile_layer fp8 and mixed prefill by launch rc=$?"
  python3 benchmarks/tune_tiles.py --models deepseek-v2-lite --classes fp8 --tokens 4096 8192 \
    --grid bm=128 bn=128,256 bk=128 warps=8 stages=3,4 group_m=0,8,16 --out $res/tiles/nvidia-h200.json \
    > $res/tiles.log 2>&1
  say "fp8 tiles tuned over group_m and BN 256 rc=$?"
}

phase38() {
  # phase 36's tests with the kernel GPU tests beside them rather than after (untimed; the servers are small)
  mkdir -p $res/tests
  kernel_tests > $res/tests/kernels_all.log 2>&1 &
  phase36_sglang
  wait
}

phase40() {
  mkdir -p $res/tests
  kernel_tests "fused_router or prefill_grouped or stream_k" > $res/tests/kernels_router.log 2>&1 &
  sglang_tests qwen2_moe
  wait
}

phase41() {
  # the decode GEMMs' warp states, each stall reason per issued instruction, with the schedulers' issue rate and the
  # occupancy (registers): whether the warps wait on loads in flight, on the MMA or on each other's instructions
  mkdir -p $res/ncu
  command -v ncu > /dev/null || { say "no ncu on this image"; return 1; }
  local what="--section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy
    --section LaunchStats --metrics regex:smsp__average_warps_issue_stalled_.*_per_issue_active.ratio"
  for t in 16 64; do
    # a forward's launches, twice at 16 tokens (stream-K: gate/up and down, the shared experts inside), once at 64 (the
    # shared experts' launches apart)
    # shellcheck disable=SC2086
    ncu --kernel-name regex:mx_moe_gemm_gluon --launch-skip 8 --launch-count 4 $what python3 benchmarks/profile_layer.py \
      --tokens $t --loop > $res/ncu/stalls-gluon-qwen15-${t}tok.txt 2>&1
    say "ncu stalls of the Gluon launches at $t tokens rc=$?"
  done
  # Marlin's only where its prebuilt modules came (.tvm-ffi-bf16.tar.xz): its JIT build takes about 8 minutes
  if marlin_bf16; then
    # shellcheck disable=SC2086
    ncu --kernel-name-base demangled --kernel-name regex:marlin_moe --launch-skip 20 --launch-count 2 $what \
      python3 benchmarks/moe_layer.py --models qwen1.5-moe-a2.7b --tokens 16 --ours-only --layouts '^$' \
      --out /tmp/ncu_ml > $res/ncu/stalls-marlin-qwen15-16tok.txt 2>&1
    say "ncu stalls of Marlin's launches at 16 tokens rc=$?"
  else
    say "no prebuilt Marlin (carry .tvm-ffi-bf16.tar.xz): its stalls not taken"
  fi
  # more warps an SM on stream-K: gate/up capped at 128 registers, 4 programs an SM; BN 64 at 80, 6 (the census),
  # beside the picked layout, every model shape, both routings; the mixed layer, w4, and the served plan's tiers
  python3 benchmarks/moe_layer.py --tokens 1 8 16 --ours-only --no-marlin \
    --layouts '^(Gluon, stream-K|stream-K, gate/up at 128 registers, 4 an SM|stream-K, BN 64, at 80 registers, 6 an SM)$' \
    --plan served=w8a16:1,w4a16g128:5,w3a16g128:11,w2a16g128:7 --out $res/layer_gate_up_cap \
    > $res/layer_gate_up_cap.log 2>&1
  say "moe_layer stream-K gate/up at 128 registers rc=$?"
}

decode_options() {  # LABEL LAYOUTS [NCU_SETTINGS...]: the decode options' GPU tests, ncu's stall reasons at 16 tokens
  # under each setting (profile_layer.py --set ...; "" the picked layout), then the layer at 1 to 64 tokens with the
  # moe_layer variants LAYOUTS matches beside the picked layout, and Marlin where its prebuilt modules came
  local label=$1 layouts=$2 set tag marlin="--no-marlin"
  shift 2
  mkdir -p $res/tests $res/ncu
  python3 -m pytest -q -m gpu tests/test_kernels_gpu.py -k "options_real_shapes" -rA -p no:cacheprovider \
    > $res/tests/gluon_options_$label.log 2>&1
  say "the decode options' GPU tests rc=$? $(tail -1 $res/tests/gluon_options_$label.log)"
  if command -v ncu > /dev/null; then
    local what="--section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy
      --section LaunchStats --metrics regex:smsp__average_warps_issue_stalled_.*_per_issue_active.ratio"
    for set in "$@"; do
      tag=$(echo "picked $set" | tr -d ' -' | tr '=' '_')
      # shellcheck disable=SC2086
      ncu --kernel-name regex:mx_moe_gemm_gluon --launch-skip 8 --launch-count 4 $what python3 benchmarks/profile_layer.py \
        --tokens 16 --loop $set > $res/ncu/stalls-gluon-qwen15-16tok-$tag.txt 2>&1
      say "ncu stalls at 16 tokens ($tag) rc=$?"
    done
  fi
  marlin_bf16 && marlin=""
  # shellcheck disable=SC2086
  python3 benchmarks/moe_layer.py --tokens 1 8 16 64 --ours-only $marlin --layouts "$layouts" \
    --plan served=w8a16:1,w4a16g128:5,w3a16g128:11,w2a16g128:7 --out $res/layer_$label > $res/layer_$label.log 2>&1
  say "moe_layer $label rc=$?"
}

phase45() {
  # ours alone (Marlin stays where carried: the target's peer), to leave phase 46 its time
  decode_options early_place \
    '^Gluon, (loads first|BN 64, loads first|BN 64, loads first, at 168 registers|2-bit codes in place|BN 64, loads first, 2-bit codes in place)$' \
    "" "--set early=true" "--set bn=64 --set early=true"
}

phase46() {  # [DIR]: the layer results to pick from (phase 45's; phase 48 gives phase 47's)
  # the pick first: the checkpoints (minutes) only where a variant won
  local tiles dir=${1:-layer_early_place}
  tiles=$(python3 benchmarks/pick_decode_tiles.py $res/$dir/moe_layer.json --layer "ours served" \
    2> $res/pick_decode_tiles_$dir.log)
  say "the pick of $dir: '${tiles}' rc=$? ($(tr '\n' ';' < $res/pick_decode_tiles_$dir.log))"
  [ -n "$tiles" ] || { say "no decode variant beat the picked layout: nothing served"; return 0; }
  prep MX_GPTQ=1
  [ -f /tmp/w/q15-24-3.25bit/config.json ] || { say "no 24-layer checkpoint (prep failed)"; return 1; }
  env NO_BF16=1 MX_GPTQ=1 DECODE_TILES="$tiles" SGLANG_ARGS="$LEAN_ARGS" benchmarks/serving_runs.sh qwen15-24 \
    $res/e2e_tiles > $res/e2e_tiles.log 2>&1
  say "e2e mxserve, mxserve with MXSERVE_DECODE_TILES=$tiles, GPTQ on Marlin rc=$?"
  pkill -f "[s]glang.launch_server"
}

phase47() {
  # the loads kept first at the picked layout's programs an SM (capped registers, a few spills); ncu on the mixed
  # layer's (BN 128 at 168, down at 128); gate/up alone at BN 64 with its loads first, down as picked; the codes in
  # place again
  decode_options capped \
    '^Gluon, (loads first, at 168 registers, down at 128|loads first, at 128 registers|gate/up at BN 64, loads first, down as picked|2-bit codes in place)$' \
    "--set early=true --set maxnreg=168 --set down_tiles.maxnreg=128" \
    "--set bn=64 --set early=true --set down_tiles.bn=picked --set down_tiles.early=picked"
}

phase48() { phase46 layer_capped; }

phase49() {
  # our w4a16g128 layer against Marlin's at the same bits, shape and routing (thirtieth session: 0.73x Marlin's speed
  # on Mixtral uniform at 16 tokens, 0.92x on Qwen1.5): each kernel's time per launch, then under ncu its stall
  # reasons, issue rate, executed instructions (InstructionStats) and memory throughput, read the same way
  # (profile_layer.py --scheme marlin): where each kernel's warps wait (Marlin's SASS runs twice our instructions a
  # weight: results/sass_census_s30_marlin_uint4.md), and the memory traffic each keeps going
  mkdir -p $res/ncu
  marlin_bf16 || { say "no prebuilt Marlin (carry .tvm-ffi-bf16.tar.xz): phase 49 needs it"; return 1; }
  local model scheme name what="--section SpeedOfLight --section WarpStateStats --section SchedulerStats
    --section Occupancy --section LaunchStats --section InstructionStats --section MemoryWorkloadAnalysis
    --metrics regex:smsp__average_warps_issue_stalled_.*_per_issue_active.ratio"
  for model in mixtral-8x7b qwen1.5-moe-a2.7b; do
    for scheme in w4a16g128 marlin; do
      python3 benchmarks/profile_layer.py --model $model --uniform --tokens 16 --scheme $scheme --launches \
        > $res/ncu/w4-$scheme-$model-16tok-uniform-launches.txt 2>&1
      say "launch times $scheme $model rc=$?"
      command -v ncu > /dev/null || continue
      name="--kernel-name regex:mx_moe_gemm_gluon"
      [ $scheme = marlin ] && name="--kernel-name-base demangled --kernel-name regex:marlin_moe"
      # shellcheck disable=SC2086
      ncu $name --launch-skip 8 --launch-count 4 $what python3 benchmarks/profile_layer.py --model $model --uniform \
        --tokens 16 --scheme $scheme --loop > $res/ncu/w4-$scheme-$model-16tok-uniform.txt 2>&1
      say "ncu $scheme $model rc=$?"
    done
  done
}

phase50() {
  # the codes tiled (arena.tile_words, MXSERVE_TILED_CODES, default on) against row by row (=0): phase 49's ncu had our
  # warps waiting on their loads (long scoreboard 7.5 cycles an instruction) with DRAM 56% busy, Marlin's 73% from
  # contiguous tiles. Launch times and ncu at 16 tokens (w4, both routings' uniform), then the layer at 1 to 64 tokens
  # both ways with Marlin, then the GPU tests of the layout (every scheme, odd sizes, stream-K, slabs, checkpoints)
  mkdir -p $res/ncu $res/tests
  local model tiled what="--section SpeedOfLight --section WarpStateStats --section SchedulerStats
    --section Occupancy --section LaunchStats --section InstructionStats --section MemoryWorkloadAnalysis
    --metrics regex:smsp__average_warps_issue_stalled_.*_per_issue_active.ratio"
  for model in mixtral-8x7b qwen1.5-moe-a2.7b; do
    for tiled in 1 0; do
      MXSERVE_TILED_CODES=$tiled python3 benchmarks/profile_layer.py --model $model --uniform --tokens 16 \
        --scheme w4a16g128 --launches > $res/ncu/w4-tiled$tiled-$model-16tok-uniform-launches.txt 2>&1
      say "launch times w4 tiled=$tiled $model rc=$?"
    done
    marlin_bf16 && python3 benchmarks/profile_layer.py --model $model --uniform --tokens 16 --scheme marlin \
      --launches > $res/ncu/w4-marlin-$model-16tok-uniform-launches.txt 2>&1
    command -v ncu > /dev/null || continue
    # shellcheck disable=SC2086
    ncu --kernel-name regex:mx_moe_gemm_gluon --launch-skip 8 --launch-count 2 $what python3 benchmarks/profile_layer.py \
      --model $model --uniform --tokens 16 --scheme w4a16g128 --loop > $res/ncu/w4-tiled1-$model-16tok-uniform.txt 2>&1
    say "ncu tiled $model rc=$?"
  done
  python3 benchmarks/moe_layer.py --tokens 1 8 16 64 --ours-only --layouts '^$' --out $res/layer_tiled \
    > $res/layer_tiled.log 2>&1
  say "moe_layer tiled rc=$?"
  MXSERVE_TILED_CODES=0 python3 benchmarks/moe_layer.py --tokens 1 8 16 64 --ours-only --layouts '^$' \
    --out $res/layer_rows > $res/layer_rows.log 2>&1
  say "moe_layer row by row rc=$?"
  python3 -m pytest -q -m gpu tests/test_kernels_gpu.py -rA -p no:cacheprovider -k "all_schemes or odd_sizes or \
gluon_kernel_real_shapes or stream_k_real_shapes or fma_kernel_real_shapes or slab or mixed_checkpoint or one_token" \
    > $res/tests/kernels_tiled.log 2>&1
  say "the tiled layout's GPU tests rc=$? $(tail -1 $res/tests/kernels_tiled.log)"
}

phase51() {
  # the decode variants again on the tiled codes (the picks were made row by row): the served plan's tiers too, for
  # benchmarks/pick_decode_tiles.py
  python3 benchmarks/moe_layer.py --tokens 1 8 16 64 --ours-only \
    --layouts '^Gluon, (stream-K|BM 8, BN 64|loads first|2-bit codes in place|gate/up at BN 64, loads first, down as picked)$' \
    --plan served=w8a16:1,w4a16g128:5,w3a16g128:11,w2a16g128:7 --out $res/layer_tiled_variants \
    > $res/layer_tiled_variants.log 2>&1
  say "moe_layer tiled variants rc=$?"
  python3 benchmarks/pick_decode_tiles.py $res/layer_tiled_variants/moe_layer.json --layer "ours served" \
    > $res/pick_tiled_variants.txt 2>&1
  say "the pick: $(tr '\n' ';' < $res/pick_tiled_variants.txt)"
}

phase52() {
  # the tiled codes served (thirty-first session: the w4 layer 0.85x its time, the mixed 0.89x, on the H100): the
  # SGLang tests of Qwen2-MoE and DeepSeek-V2 on them (the tiny models' K is 128), the 8 and 16-row blocks against the
  # picked ones and the blocks taken 2 or 4 at a time over every N tile (Tiles.group_m: an expert with more rows than
  # a block reads its weights once per block, 1.43 times on average for Mixtral at 64 tokens; side by side, the later
  # blocks read them from L2), then end to end: the committed 3.25-bit plan of
  # the 24-layer Qwen1.5-shaped model, tiled as served by default, beside the GPTQ copy on Marlin (~20 min)
  sglang_tests qwen2_moe deepseek_v2
  python3 benchmarks/moe_layer.py --tokens 8 16 64 --ours-only --layouts '^Gluon, (BM 16|BM 8|blocks [24] at a time)$' \
    --plan served=w8a16:1,w4a16g128:5,w3a16g128:11,w2a16g128:7 --out $res/layer_tiled_bm > $res/layer_tiled_bm.log 2>&1
  say "moe_layer tiled, BM 8 and 16, blocks 2 and 4 at a time rc=$?"
  prep MX_GPTQ=1
  [ -f /tmp/w/q15-24-3.25bit/config.json ] || { say "no 24-layer checkpoint (prep failed)"; return 1; }
  env NO_BF16=1 MX_GPTQ=1 SGLANG_ARGS="$LEAN_ARGS" benchmarks/serving_runs.sh qwen15-24 $res/e2e_tiled \
    > $res/e2e_tiled.log 2>&1
  say "e2e mxserve (codes tiled) beside the GPTQ copy on Marlin rc=$?"
  pkill -f "[s]glang.launch_server"
}

phase53() {
  # where the tiled w4 layer's DRAM bytes go (thirty-first session: Mixtral's gate/up at 16 tokens moved 541 MB where
  # its weights take 499; re-reads explain about 1% there, 43% at 64 tokens): bytes read and written, by ncu, at 16 and
  # 64 tokens, the blocks as launched and 4 at a time (Tiles.group_m) (~4 min)
  mkdir -p $res/ncu
  command -v ncu > /dev/null || { say "no ncu on this image"; return 1; }
  local t g what="--section SpeedOfLight --section MemoryWorkloadAnalysis --section LaunchStats
    --metrics dram__bytes_read.sum,dram__bytes_write.sum,lts__t_sectors_srcunit_tex_op_read.sum,lts__t_sector_hit_rate.pct"
  for t in 16 64; do
    for g in 0 4; do
      # shellcheck disable=SC2086
      ncu --kernel-name regex:mx_moe_gemm_gluon --launch-skip 8 --launch-count 2 $what python3 benchmarks/profile_layer.py \
        --model mixtral-8x7b --uniform --tokens $t --scheme w4a16g128 --loop --set group_m=$g \
        > $res/ncu/bytes-w4-mixtral-${t}tok-uniform-group$g.txt 2>&1
      say "ncu DRAM bytes, Mixtral w4, $t tokens, group_m=$g rc=$?"
    done
  done
}

phase54() {
  # the thirty-first session's last changes on the GPU (weight-only scales and zeros tiled with the codes, the default;
  # the Gluon decode kernel's blocks taken 2 or 4 at a time, Tiles.group_m, opt-in): the layer at 1, 16 and 64 tokens
  # beside every baseline in one run (SGLang bf16, fp8, Marlin w4a16g128: issue 10's acceptance table) with the
  # served plan's tiers and the blocks 2 or 4 at a time; then their GPU tests beside the 24-layer checkpoints and the
  # GPTQ copy; then end to end, the default beside the GPTQ copy on Marlin, and the pick if a variant won (~22 min)
  python3 benchmarks/moe_layer.py --tokens 1 16 64 --layouts '^Gluon, blocks [24] at a time$' \
    --plan served=w8a16:1,w4a16g128:5,w3a16g128:11,w2a16g128:7 --out $res/layer_s32 > $res/layer_s32.log 2>&1
  say "moe_layer, every baseline, blocks 2 and 4 at a time rc=$?"
  prep_beside "all_schemes or odd_sizes or gluon_kernel_real_shapes or options_real_shapes or fma_kernel_real_shapes \
or one_token or mixed_checkpoint or slab" kernels_s32.log MX_GPTQ=1 || return 1
  say "GPU tests: $(tail -1 $res/tests/kernels_s32.log)"
  local tiles
  tiles=$(python3 benchmarks/pick_decode_tiles.py $res/layer_s32/moe_layer.json --layer "ours served" --tokens 1 16 64 \
    2> $res/pick_s32.log)
  say "the pick: '${tiles}' ($(tr '\n' ';' < $res/pick_s32.log))"
  env NO_BF16=1 MX_GPTQ=1 ${tiles:+DECODE_TILES="$tiles"} SGLANG_ARGS="$LEAN_ARGS" benchmarks/serving_runs.sh \
    qwen15-24 $res/e2e_s32 > $res/e2e_s32.log 2>&1
  say "e2e mxserve (scales tiled${tiles:+, and with $tiles}) beside the GPTQ copy on Marlin rc=$?"
  pkill -f "[s]glang.launch_server"
}

phase55() {
  # issue 10 item 4 with the thirty-second session's H100 kernel profile (results/h100-kernel-profile-s32.json): priced
  # with it at r = 0.25 for 8-token forwards, the 24-layer plan at 3.25 bits is 3% w3 (r = 1: 43%), its predicted
  # decode time 15% lower (benchmarks/plans/qwen15-24l-3.25bit-r0.25-t8-h100.json). Served beside the committed plan
  # and the GPTQ copy on Marlin (~6 min on checkpoints made before; ~10 with them)
  prep MX_GPTQ=1
  [ -f /tmp/w/q15-24-3.25bit/config.json ] || { say "no 24-layer checkpoint (prep failed)"; return 1; }
  # and the committed plan with phase 56's pick (Tiles.staged), where one won
  local tiles; tiles=$(cat $res/pick_staged.setting 2> /dev/null)
  env NO_BF16=1 MX_GPTQ=1 ALSO_PLAN=benchmarks/plans/qwen15-24l-3.25bit-r0.25-t8-h100.json:3.25bit-r0.25-t8-h100 \
    ${tiles:+DECODE_TILES="$tiles"} SGLANG_ARGS="$LEAN_ARGS" benchmarks/serving_runs.sh qwen15-24 $res/e2e_r_h100 \
    > $res/e2e_r_h100.log 2>&1
  say "e2e mxserve at r = 1 and r = 0.25 (H100 profile)${tiles:+, r = 1 with $tiles}, GPTQ on Marlin rc=$?"
  pkill -f "[s]glang.launch_server"
}

phase56() {
  # the activations through shared memory (Tiles.staged, thirty-second session, built after the budget): its GPU
  # tests; the layer at 8, 16 and 64 tokens with it, at the picked blocks and at 32 rows (BN as picked and 64), beside
  # the picked layout and Marlin, with the served plan's tiers, and the pick; then Mixtral's 64-token w4 launches
  # under ncu staged at 32 rows, BN 64, beside phase 53's files (~9 min)
  mkdir -p $res/ncu $res/tests
  kernel_tests "options_real_shapes" > $res/tests/kernels_staged.log 2>&1
  say "staged GPU tests: $(tail -1 $res/tests/kernels_staged.log)"
  python3 benchmarks/moe_layer.py --tokens 8 16 64 --ours-only \
    --layouts '^Gluon, (staged|BM 32, staged|BM 32, BN 64, staged)$' --plan served=w8a16:1,w4a16g128:5,w3a16g128:11,w2a16g128:7 --out $res/layer_staged > $res/layer_staged.log 2>&1
  say "moe_layer staged rc=$?"
  python3 benchmarks/pick_decode_tiles.py $res/layer_staged/moe_layer.json --layer "ours served" --tokens 8 16 64 \
    > $res/pick_staged.setting 2> $res/pick_staged.txt
  say "the pick: '$(cat $res/pick_staged.setting)' ($(tr '\n' ';' < $res/pick_staged.txt))"
  command -v ncu > /dev/null || return 0
  local what="--section SpeedOfLight --section MemoryWorkloadAnalysis --section LaunchStats --section WarpStateStats
    --metrics dram__bytes_read.sum,dram__bytes_write.sum,lts__t_sector_hit_rate.pct"
  # shellcheck disable=SC2086
  ncu --kernel-name regex:mx_moe_gemm_gluon --launch-skip 8 --launch-count 2 $what python3 benchmarks/profile_layer.py \
    --model mixtral-8x7b --uniform --tokens 64 --scheme w4a16g128 --loop --set staged=true --set bm=32 --set bn=64 \
    > $res/ncu/bytes-w4-mixtral-64tok-uniform-staged-bm32-bn64.txt 2>&1
  say "ncu staged, Mixtral w4, 64 tokens rc=$?"
}

phase57() {
  # the thirty-third session's staged default (moe.STAGED_ROWS: Mixtral from 16 tokens) beside every baseline, the
  # picked layout held beside it ("Gluon, held"); the GPU tests of the default paths; then what bounds the 1-token
  # GEMMs (end to end at 1 request, our MoE section asks 31 us of 37.7): ncu of Qwen1.5's 1-token launches, the layer
  # benchmark's mixed set (w4 + w2) and the served plan's tiers, Marlin's beside, and the ring's (~13 min)
  mkdir -p $res/ncu $res/tests
  # first the codes through a ring of shared memory (Tiles.ring, thirty-fourth session, CPU-built): 2 or 3 K tiles in
  # flight a program where one was, at 1 and 8 tokens beside the picked layout (~2 min)
  python3 benchmarks/moe_layer.py --tokens 1 8 --ours-only \
    --layouts '^stream-K, codes .*$' \
    --plan served=w8a16:1,w4a16g128:5,w3a16g128:11,w2a16g128:7 --out $res/layer_ring > $res/layer_ring.log 2>&1
  say "moe_layer, the ring at 1 and 8 tokens rc=$?"
  kernel_tests "options_real_shapes" > $res/tests/kernels_ring.log 2>&1
  say "ring GPU tests: $(tail -1 $res/tests/kernels_ring.log)"
  # (and two stream-K variants that keep more weight bytes in flight an SM: at 1 token a program's K tiles take about
  # one DRAM round trip each, benchmarks/README.md, thirty-third session)
  python3 benchmarks/moe_layer.py --tokens 1 16 64 \
    --layouts '^(Gluon, (held|staged)|stream-K, BN 128|stream-K, gate/up at 128 registers, 4 an SM|Gluon, codes 3 tiles ahead \(ring 4\))$' \
    --plan served=w8a16:1,w4a16g128:5,w3a16g128:11,w2a16g128:7 --out $res/layer_s34 > $res/layer_s34.log 2>&1
  say "moe_layer, every baseline, staged by default rc=$?"
  kernel_tests "all_schemes or odd_sizes or gluon_kernel_real_shapes or counts_routing" > $res/tests/kernels_s34.log 2>&1
  say "kernel tests: $(tail -1 $res/tests/kernels_s34.log)"
  command -v ncu > /dev/null || return 0
  local what="--section SpeedOfLight --section MemoryWorkloadAnalysis --section LaunchStats --section WarpStateStats
    --section Occupancy --metrics dram__bytes_read.sum,sm__cycles_active.avg,sm__cycles_active.max"
  local s
  for s in mixed served marlin; do
    local args="--scheme $s"
    [ $s = served ] && args="--plan served=w8a16:1,w4a16g128:5,w3a16g128:11,w2a16g128:7"
    # shellcheck disable=SC2086
    ncu --kernel-name regex:'mx_moe_gemm_gluon|Marlin' --launch-skip 8 --launch-count 2 $what python3 \
      benchmarks/profile_layer.py --tokens 1 $args --loop > $res/ncu/qwen15-1tok-$s.txt 2>&1
    say "ncu 1 token, $s rc=$?"
  done
  # shellcheck disable=SC2086
  ncu --kernel-name regex:mx_moe_gemm_gluon --launch-skip 8 --launch-count 2 $what python3 benchmarks/profile_layer.py \
    --tokens 1 --plan served=w8a16:1,w4a16g128:5,w3a16g128:11,w2a16g128:7 --loop --set ring=4 --set staged=false \
    > $res/ncu/qwen15-1tok-served-ring4.txt 2>&1
  say "ncu 1 token, served, ring 4 rc=$?"
}

phase58() {
  # the thirty-fourth session's ring of codes (2 or 3 K tiles in flight a program) lost at 1 token, so bytes in flight do
  # not bound it. Under ncu the 1-token GEMMs' SM throughput is 29 to 33% of peak, each warp stalled 2.6 to 3.0 cycles an
  # instruction on L1TEX (global loads) whether the codes come from registers or the ring, and the SMs are active 69 to
  # 79% of the launch. Which loads the warps wait on: ncu's stall samples per SASS instruction (source page) of the served
  # plan's 1-token gate/up and down launches; then, at 1 and 8 tokens, the options that move loads (~4 min)
  mkdir -p $res/ncu
  local plan="served=w8a16:1,w4a16g128:5,w3a16g128:11,w2a16g128:7"
  if command -v ncu > /dev/null; then
    ncu --kernel-name regex:mx_moe_gemm_gluon --launch-skip 8 --launch-count 2 --section WarpStateStats \
      --section SourceCounters -f -o $res/ncu/qwen15-1tok-served-source python3 benchmarks/profile_layer.py --tokens 1 \
      --plan $plan --loop > $res/ncu/qwen15-1tok-served-source.log 2>&1
    ncu -i $res/ncu/qwen15-1tok-served-source.ncu-rep --page source --csv --print-source sass \
      > $res/ncu/qwen15-1tok-served-sass.csv 2> $res/ncu/qwen15-1tok-served-sass.err
    say "ncu stall samples by SASS instruction, 1 token rc=$?"
    # the report only where its export failed (it is read here with ncu's own tools)
    [ -s $res/ncu/qwen15-1tok-served-sass.csv ] && rm -f $res/ncu/qwen15-1tok-served-source.ncu-rep
    xz -9 $res/ncu/qwen15-1tok-served-sass.csv
  fi
  python3 benchmarks/moe_layer.py --tokens 1 8 --ours-only \
    --layouts '^(Gluon, loads first|Gluon, BN 64, loads first|Gluon, staged|Gluon, held)$' --plan $plan \
    --out $res/layer_loads > $res/layer_loads.log 2>&1
  say "moe_layer, loads first and staged at 1 and 8 tokens rc=$?"
}

phase59() {
  # the layer beside every baseline again, with moe_layer.py's skewed routing fixed (thirty-fourth session, after its
  # run): until then each draw took its own order of popularity, so the tiered plans' first tiers (the mixed plan's w4,
  # the served plan's w8) went to experts no more popular than the rest, and the skewed cells of ours mixed and served
  # read fewer bytes than a plan that follows the routing would (~7 min)
  python3 benchmarks/moe_layer.py --tokens 1 16 64 --layouts '^Gluon, held$' \
    --plan served=w8a16:1,w4a16g128:5,w3a16g128:11,w2a16g128:7 --out $res/layer_s35 > $res/layer_s35.log 2>&1
  say "moe_layer, every baseline, the skewed routing fixed rc=$?"
}

phase60() {
  # the SGLang GPU tests of Qwen2-MoE (the reference model's architecture), last passed whole in the nineteenth session,
  # before the codes and scales were tiled (thirty-first and second), and two of DeepSeek-V2's: four pytest processes
  # side by side, two tests each (~6 min)
  mkdir -p $res/tests
  local i=0 sel
  for sel in "qwen2_moe and (mixed_checkpoint or shared_experts)" "stream_k_decode and qwen2_moe or fused_router" \
    "all_bf16 and qwen2_moe or programmatic" "deepseek_v2 and (mixed_checkpoint or stream_k)"; do
    i=$((i + 1))
    (MXSERVE_TEST_SGLANG_ARGS="$SMALL --max-total-tokens 16384" MXSERVE_TEST_SERVER_LOGS=$res/tests/servers_$i.log \
      python3 -m pytest -q -m gpu tests/test_sglang_gpu.py -k "$sel" --basetemp=/tmp/pt_s$i -rA -p no:cacheprovider \
      > $res/tests/sglang_$i.log 2>&1; say "tests ($sel) rc=$? $(tail -1 $res/tests/sglang_$i.log)") &
  done
  wait
}

phase61() {
  # the products as warpgroup MMAs (Tiles.wgmma, thirty-sixth session): its GPU tests (every scheme mixed, blocks of 8 to
  # 64 rows, both grids), then the layer beside the picked layout held and Marlin at 8, 16 and 64 tokens, at the picked
  # block, 32 and 64 rows (~6 min)
  mkdir -p $res/tests
  python3 -m pytest -q -m gpu tests/test_kernels_gpu.py -k "options_real_shapes and wgmma" -rA -p no:cacheprovider \
    > $res/tests/kernels_wgmma.log 2>&1
  say "GPU tests of the warpgroup MMAs rc=$? $(tail -1 $res/tests/kernels_wgmma.log)"
  python3 benchmarks/moe_layer.py --tokens 8 16 64 --ours-only --layouts '^Gluon, (held|wgmma.*)$' \
    --plan served=w8a16:1,w4a16g128:5,w3a16g128:11,w2a16g128:7 --out $res/layer_s36_wgmma > $res/layer_s36_wgmma.log 2>&1
  say "moe_layer, warpgroup MMAs beside the held layout and Marlin rc=$?"
}

phase62() {
  # the warpgroup MMAs capped at 168 registers, 3 programs an SM (uncapped they hold 191 to 254 at 16 rows, 2 an SM;
  # phase 61 found them 1.15x the held layout's time), at 16 and 64 tokens (~3 min)
  python3 benchmarks/moe_layer.py --tokens 16 64 --ours-only --layouts '^Gluon, (held|wgmma(, BM 32)?, at 168 registers)$' \
    --plan served=w8a16:1,w4a16g128:5,w3a16g128:11,w2a16g128:7 --out $res/layer_s36_wgmma168 \
    > $res/layer_s36_wgmma168.log 2>&1
  say "moe_layer, warpgroup MMAs at 168 registers rc=$?"
}

phase69() {
  # the thirty-eighth session's scales and zeros in pair order (arena.tile_rows: rows r and r + 8 of a row group side
  # by side, one 4-byte load a lane where each row took a 2-byte load with its own address; sm_90 SASS: 7 to 10% fewer
  # instructions in the weight-only K loops, 4 programs an SM for the served plan's code set where 3 fit): the kernel
  # GPU tests that read tiled scales (every scheme, the Gluon kernel on real shapes on both grids), then the layer
  # beside every baseline at 1, 16 and 64 tokens (phase 59's command; ~9 min)
  mkdir -p $res/tests
  kernel_tests "all_schemes or gluon_kernel_real_shapes or gluon_kernel_stream_k_real_shapes" > $res/tests/kernels_pairs.log 2>&1
  say "GPU tests, scales in pair order: $(tail -1 $res/tests/kernels_pairs.log)"
  python3 benchmarks/moe_layer.py --tokens 1 16 64 --layouts '^Gluon, held$' \
    --plan served=w8a16:1,w4a16g128:5,w3a16g128:11,w2a16g128:7 --out $res/layer_s38 > $res/layer_s38.log 2>&1
  say "moe_layer, every baseline, scales in pair order rc=$?"
}

phase68() {
  # end to end after the thirty-eighth session's fold change (router_stats writes half as much, a fold in SGLang's
  # scheduler process holding its GIL), with the GPTQ copy on Marlin also under --enable-metrics, which mxserve launch
  # always passes, and each server's requests streamed one at a time (serving.py: time to the first token, time per
  # output token): in the thirty-eighth session's run mxserve's requests took about 9 ms more beside their decode steps
  # than the GPTQ copy's, its decode steps 0.90x the time (phase 55; ~12 min: two calls)
  prep MX_GPTQ=1
  [ -f /tmp/w/q15-24-3.25bit/config.json ] || { say "no 24-layer checkpoint (prep failed)"; return 1; }
  env NO_BF16=1 MX_GPTQ=1 METRICS=1 ALSO_PLAN=benchmarks/plans/qwen15-24l-3.25bit-r0.25-t8-h100.json:3.25bit-r0.25-t8-h100 \
    SGLANG_ARGS="$LEAN_ARGS" benchmarks/serving_runs.sh qwen15-24 $res/e2e_s38 > $res/e2e_s38.log 2>&1
  say "e2e mxserve at r = 1 and r = 0.25, the GPTQ copy with and without --enable-metrics rc=$?"
  pkill -f "[s]glang.launch_server" || true
}

phase70() {
  # the scales and zeros in pair order (thirty-eighth session), tested on the H100 in the thirty-ninth but for these:
  # the CUDA-core layouts that read them (the Triton kernel's fma-prefetch and fma-fold), the whole layer, and the
  # SGLang tests of Qwen2-MoE and DeepSeek-V2 (phase 60, last run before the pair order), one after the other (~10 min)
  mkdir -p $res/tests
  kernel_tests "every_layout and (fma-prefetch or fma-fold) or whole_layer" > $res/tests/kernels_pairs_rest.log 2>&1
  say "GPU tests, the pair order's rest: $(tail -1 $res/tests/kernels_pairs_rest.log)"
  phase60
}

phase71() {
  # 16-row blocks: under skewed routing most rows sit in a few experts (Qwen3 at 64 tokens: 62 rows in one), each
  # unpacked again by every 8-row block; 16-row blocks take 0.62x the K-loop instructions a row, so counted in
  # instructions they would cut the skewed 64-token cells' work by 6 to 10% (by 17 to 20% taken per expert), yet
  # measured 1.18 to 1.24x the time (thirty-seventh session). Uncapped they hold 178 registers (2 programs an SM):
  # capped at 168 (3 an SM, 5 spills in gate/up's K loop) or on 64-row tiles, beside the held 8 and the uncapped 16
  python3 benchmarks/moe_layer.py --tokens 16 64 --ours-only \
    --layouts '^Gluon, (held|BM 16|BM 16, at 168 registers|BM 16, BN 64)$' --out $res/layer_s39_bm16 \
    > $res/layer_s39_bm16.log 2>&1
  say "moe_layer, 16-row blocks by registers rc=$?"
}

phase72() {
  # issue 10 item 4 with the thirty-ninth session's kernels: this GPU's kernel profile (the last, h100-kernel-profile-s32,
  # timed kernels since replaced), the 24-layer plan at 3.25 bits and r = 0.25 for 8-token forwards priced with it,
  # built with the other checkpoints beside the kernel tests of the pair order's rest (phase 70's), then served beside
  # the committed plan and the GPTQ copy with and without --enable-metrics (phase 68's run; ~14 min)
  mkdir -p $res/plans
  phase6
  [ -f $res/kernel-profile.json ] || return 1
  PYTHONPATH=.:$PYTHONPATH python3 benchmarks/synthetic_profile.py --config benchmarks/configs/qwen1.5-moe-a2.7b.json \
    --layers 24 --out $res/plans/synthetic-24l.json > $res/plans/plan.log 2>&1
  local t=${PLAN_TOKENS:-8}  # the forwards the plan is priced for (the fortieth session's run: 8)
  python3 -m mxserve.cli plan --profile $res/plans/synthetic-24l.json --budget 3.25bit --r 0.25 --tokens $t \
    --schemes $PLAN_SCHEMES --kernel-profile $res/kernel-profile.json \
    --out $res/plans/qwen15-24l-3.25bit-r0.25-t$t-profiled.json >> $res/plans/plan.log 2>&1
  say "plan rc=$?"
  [ -f $res/plans/qwen15-24l-3.25bit-r0.25-t$t-profiled.json ] || return 1
  local also=$res/plans/qwen15-24l-3.25bit-r0.25-t$t-profiled.json:3.25bit-r0.25-t$t-profiled
  prep_beside "every_layout and (fma-prefetch or fma-fold) or whole_layer" kernels_pairs_rest.log ALSO_PLAN=$also || return 1
  say "GPU tests, the pair order's rest: $(tail -1 $res/tests/kernels_pairs_rest.log)"
  env NO_BF16=1 MX_GPTQ=1 METRICS=1 ALSO_PLAN=$also SGLANG_ARGS="$LEAN_ARGS" benchmarks/serving_runs.sh qwen15-24 \
    $res/e2e_profiled > $res/e2e_profiled.log 2>&1
  say "e2e mxserve at r = 1 and r = 0.25 (this profile), the GPTQ copy with and without --enable-metrics rc=$?"
  pkill -f "[s]glang.launch_server" || true
}

phase73() {
  # MXSERVE_TOPK_ROWS (forty-first session): the kernel GPU tests of the top-k's rows and of stream-K beside the
  # checkpoints of the 1-token plan priced by the forty-first session's profile; the layer at 1 and 8 tokens (its tiers
  # and the mixed plan, every model), the down GEMM on 128-row tiles beside; end to end, that plan with and without
  # the top-k's rows and with the down GEMM's 128-row tiles, beside the GPTQ copy; the SGLang test last
  local plan=benchmarks/plans/qwen15-24l-3.25bit-r0.25-t1-h100-s41.json
  prep_beside "top_k_rows_straight or stream_k or programmatic" kernels_topk_rows.log PLAN=$plan NAME=3.25bit-t1 \
    || return 1
  say "GPU tests, the top-k's rows and stream-K: $(tail -1 $res/tests/kernels_topk_rows.log)"
  python3 benchmarks/moe_layer.py --tokens 1 8 --ours-only \
    --layouts '^(Gluon, stream-K|stream-K, top-k rows|down BN 128|gate/up at 96 registers(, down BN 128)?)$' \
    --plan t1=w4a16g128:7,w8a16:1,w3a16g128:9,w2a16g128:8 --out $res/layer_topk_rows > $res/layer_topk_rows.log 2>&1
  say "moe_layer at 1 and 8 tokens, the top-k's rows, down on 128-row tiles rc=$?"
  env NO_BF16=1 MX_GPTQ=1 PLAN=$plan NAME=3.25bit-t1 TOPK_ROWS=1 DECODE_TILES=down_tiles.bn=128 \
    SGLANG_ARGS="$LEAN_ARGS" benchmarks/serving_runs.sh qwen15-24 $res/e2e_topk_rows > $res/e2e_topk_rows.log 2>&1
  say "e2e the 1-token plan, with the top-k's rows, with down on 128-row tiles; the GPTQ copy rc=$?"
  pkill -f "[s]glang.launch_server" || true
  MXSERVE_TEST_SGLANG_ARGS="$SMALL --max-total-tokens 16384" python3 -m pytest -q -m gpu tests/test_sglang_gpu.py \
    -k top_k_rows --basetemp=/tmp/pt_topk -rA -p no:cacheprovider > $res/tests/sglang_topk_rows.log 2>&1
  say "SGLang test of the top-k's rows rc=$? $(tail -1 $res/tests/sglang_topk_rows.log)"
}

phase75() {
  # phase 74 cut to the forty-third session's budget (~13 min; phase 74 never ran: it was missing from the functions
  # the chain declares): the host's time of an eager forward with the launches' picks kept and afresh; the 1-token
  # plan's checkpoints beside the GPU test of the early start's choice; end to end, that plan by default beside the
  # GPTQ copy, each server's prefill of one prompt traced; the SGLang tests of the top-k's rows and the fused router
  # (the MoE-block hooks per block)
  local plan=benchmarks/plans/qwen15-24l-3.25bit-r0.25-t1-h100-s41.json
  python3 benchmarks/host_overhead.py --tokens 1 8 20 64 --out $res/host_overhead > $res/host_overhead.log 2>&1
  say "host time of an eager forward rc=$?"
  prep_beside "top_k_rows_straight_before" kernels_early_choice.log PLAN=$plan NAME=3.25bit-t1 || return 1
  say "GPU test of the early start's choice: $(tail -1 $res/tests/kernels_early_choice.log)"
  env NO_BF16=1 MX_GPTQ=1 PLAN=$plan NAME=3.25bit-t1 SGLANG_ARGS="$LEAN_ARGS" \
    benchmarks/serving_runs.sh qwen15-24 $res/e2e_s43 > $res/e2e_s43.log 2>&1
  say "e2e the 1-token plan by default; the GPTQ copy rc=$?"
  pkill -f "[s]glang.launch_server" || true
  MXSERVE_TEST_SGLANG_ARGS="$SMALL --max-total-tokens 16384" python3 -m pytest -q -m gpu tests/test_sglang_gpu.py \
    -k "top_k_rows or fused_router" --basetemp=/tmp/pt_hooks -rA -p no:cacheprovider > $res/tests/sglang_hooks.log 2>&1
  say "SGLang tests of the top-k's rows and the fused router rc=$? $(tail -1 $res/tests/sglang_hooks.log)"
}

phase76() {
  # what phase 75 left of phase 74 (forty-third session), cut to the forty-fourth session's budget (1109 s left after
  # the machines that did not come, then 704): Qwen1.5-MoE's layer at 8 and 16 tokens with the down GEMM's K split
  # in 2 and 3, with the shared experts in the routed launches, on the stream-K grid, and with the grid's routed slots
  # straight from the top-k (MXSERVE_TOPK_GRID, written in the forty-fourth session) beside the grid aligned; the
  # 1-token plan's checkpoints beside the GPU tests of the grid's top-k rows; end to end at 1 and 8 requests, that
  # plan by default, with MXSERVE_TOPK_GRID=1 where its GPU tests passed, and with the statistics folded every 5 s
  # in place of every 1 s (a busy fold of Qwen1.5's 24 x 60 experts takes the scheduler process's GIL about 8 ms on
  # this project's CPU, since the forty-third session a layer's writes at a time; at 1 request each of ours spent
  # 15.3 ms beside its decode steps where the GPTQ copy's 9.7, the first token as fast); the copy itself is not served
  # again (the forty-third session's run has it beside the default) (~9 min, two calls)
  local plan=benchmarks/plans/qwen15-24l-3.25bit-r0.25-t1-h100-s41.json ckpt=/tmp/w/q15-24-3.25bit-t1
  python3 benchmarks/moe_layer.py --tokens 8 16 --ours-only --models qwen1.5-moe-a2.7b \
    --layouts '^(Gluon, stream-K|down split [23]|shared in the routed launches|no stream-K|grid, top-k rows)$' \
    --plan t1=w4a16g128:7,w8a16:1,w3a16g128:9,w2a16g128:8 --no-marlin --out $res/layer_s44 > $res/layer_s44.log 2>&1
  say "moe_layer at 8 and 16 tokens, the down GEMM's K split, the grid's top-k rows rc=$?"
  prep_beside "routed_slots_straight" kernels_s44.log PLAN=$plan NAME=3.25bit-t1 || return 1
  say "GPU tests, the top-k's rows: $(tail -1 $res/tests/kernels_s44.log)"
  e2e_s44 $plan $ckpt
}

e2e_s44() {  # PLAN CKPT [TESTS [NO_FOLD5]]: phase 76's end to end (serving.py at 1 and 8 requests): by default, with
  # MXSERVE_TOPK_GRID=1 where the GPU tests of the top-k rows passed ($res/tests/TESTS, kernels_s44.log unless
  # given), and with the statistics folded every 5 s (not if a fourth argument is given: phase 81 timed it)
  local plan=$1 ckpt=$2 tests=$res/tests/${3:-kernels_s44.log}
  local grid=() fold=(--ckpt "3.25bit-t1-fold5=$ckpt" --launch-args "3.25bit-t1-fold5=--stats-interval 5")
  local tag="the grid's top-k rows; statistics folded every 5 s"
  [ -n "${4:-}" ] && fold=() && tag="the grid's top-k rows"
  grep -q " passed" $tests && ! grep -Eq " (failed|error)" $tests &&
    grid=(--ckpt "3.25bit-t1-topk-grid=$ckpt" --server-env "mxserve-3.25bit-t1-topk-grid=MXSERVE_TOPK_GRID=1"
          --compare "mxserve-3.25bit-t1:mxserve-3.25bit-t1-topk-grid")
  python3 benchmarks/serving.py --model /tmp/w/qwen15 --skip-bf16 --ckpt "3.25bit-t1=$ckpt" "${grid[@]}" "${fold[@]}" \
    --startup-timeout 300 --max-tokens 128 --concurrency 1 8 --sglang-args "$LEAN_ARGS" \
    --tag "Qwen1.5-MoE-A2.7B, all 24 layers, random weights: $tag" \
    --out $res/e2e_s44 > $res/e2e_s44.log 2>&1
  say "e2e by default${grid:+, with MXSERVE_TOPK_GRID=1}${fold:+, with the statistics folded every 5 s} rc=$?"
  pkill -f "[s]glang.launch_server" || true
}

phase78() {
  # phase 76's end to end after phase 77 (forty-fifth session: 1034 s of device time left after the machines that did
  # not come, so the layer and its tests first, in a call of their own): the 1-token plan's checkpoints (no GPTQ copy:
  # it is not served), then e2e_s44 (~6 min)
  local plan=benchmarks/plans/qwen15-24l-3.25bit-r0.25-t1-h100-s41.json ckpt=/tmp/w/q15-24-3.25bit-t1
  prep MX_ONLY=1 PLAN=$plan NAME=3.25bit-t1
  [ -f $ckpt/config.json ] || { say "no 24-layer checkpoint 3.25bit-t1 (prep failed)"; return 1; }
  e2e_s44 $plan $ckpt
}

grid_topk_runs() {  # NAME TOKENS LAYOUTS: Qwen1.5-MoE's layer at TOKENS with those layouts (Marlin left out), then the
  # GPU tests of the grid's top-k rows ($res/layer_NAME, $res/tests/kernels_NAME.log)
  python3 benchmarks/moe_layer.py --tokens $2 --ours-only --models qwen1.5-moe-a2.7b --layouts "$3" \
    --plan t1=w4a16g128:7,w8a16:1,w3a16g128:9,w2a16g128:8 --no-marlin --out $res/layer_$1 > $res/layer_$1.log 2>&1
  say "moe_layer at $2 tokens, $3 rc=$?"
  mkdir -p $res/tests
  kernel_tests "routed_slots_straight" > $res/tests/kernels_$1.log 2>&1
  say "GPU tests, the grid's top-k rows: $(tail -1 $res/tests/kernels_$1.log)"
}

phase77() {
  # phase 76 cut to what about 5 minutes hold (the forty-fourth session: 434 s of device time left after the machines
  # that did not come): Qwen1.5-MoE's layer at 8 and 16 tokens, the grid aligned ("no stream-K") beside its routed
  # slots straight from the top-k (MXSERVE_TOPK_GRID) and the down GEMM's K split in 2 and 3; then the grid's top-k
  # GPU tests (~3 min, one call)
  grid_topk_runs s44 "8 16" '^(no stream-K|grid, top-k rows|down split [23])$'
}

phase79() {
  # phase 77 cut to what 364 s of device time hold (forty-fifth session): the layer at 8 tokens, the grid aligned beside
  # its routed slots straight from the top-k, then the grid's top-k GPU tests (~2.5 min, one call). Phases 76, 77 and 79
  # leave Marlin out of the layer (--no-marlin): they compare our layouts, and without .tvm-ffi-bf16.tar.xz carried its JIT
  # build would take about 8 minutes of the call
  grid_topk_runs s45 8 '^(no stream-K|grid, top-k rows)$'
}

phase80() {
  # the forty-sixth session's: MXSERVE_TOPK_GRID on stream-K too (stream-K takes 8 and 16 tokens for plans with a tenth
  # or less of their weights in costly codes; the served t1 plan's 37% keep them on the grid). Qwen1.5-MoE's
  # layer at 8 and 16 tokens: stream-K aligned and with the top-k rows (uncapped and gate/up at 168 registers), the
  # grid aligned and with them; then the GPU tests of the top-k rows on both (~3.5 min, one call)
  grid_topk_runs s46 "8 16" '^(Gluon, stream-K|no stream-K|grid, top-k rows|stream-K, top-k rows beyond one token.*)$'
}

phase82() {
  # phase 80 cut to what a short lease holds: 8 tokens, the grid (the served t1 plan's layout there) and stream-K, each
  # aligned and with the top-k rows, then the same GPU tests (~3 min); then phase 81
  grid_topk_runs s46 8 '^(Gluon, stream-K|no stream-K|grid, top-k rows|stream-K, top-k rows beyond one token)$'
}

phase83() {
  # the forty-seventh session's: stream-K's top-k rows without gl.cumsum (Triton 3.6's Gluon has none; phase 82's two
  # stream-K cases failed to compile, its four grid cases passed): the six GPU tests of the top-k rows, then the layer at
  # 8 tokens, stream-K aligned beside its top-k rows, the grid (picked there) aligned and with its top-k rows, and the
  # down GEMM's K split in 2 and 3 (the forty-second session's variants) (~4 min). Ran in the forty-eighth session with
  # the down GEMM's weights two tiles ahead too (its GPU tests and layer variants; removed after: they did not pay)
  mkdir -p $res/tests
  kernel_tests "routed_slots_straight" > $res/tests/kernels_s47.log 2>&1
  say "GPU tests, the top-k rows on the grid and on stream-K: $(tail -1 $res/tests/kernels_s47.log)"
  python3 benchmarks/moe_layer.py --tokens 8 --ours-only --models qwen1.5-moe-a2.7b --no-marlin \
    --layouts '^(Gluon, stream-K|stream-K, top-k rows beyond one token|no stream-K|grid, top-k rows|down split [23])$' \
    --plan t1=w4a16g128:7,w8a16:1,w3a16g128:9,w2a16g128:8 --out $res/layer_s47 > $res/layer_s47.log 2>&1
  say "moe_layer at 8 tokens, stream-K aligned and with the top-k rows rc=$?"
}

phase84() {
  # after 83: phase 81's end to end gated on phase 83's tests (MXSERVE_TOPK_GRID=1 beside the default at 1 and 8
  # requests; the statistics folded every 5 s left out: phase 81's run found no change) (~4.5 min)
  local plan=benchmarks/plans/qwen15-24l-3.25bit-r0.25-t1-h100-s41.json ckpt=/tmp/w/q15-24-3.25bit-t1
  prep MX_ONLY=1 PLAN=$plan NAME=3.25bit-t1
  [ -f $ckpt/config.json ] || { say "no 24-layer checkpoint 3.25bit-t1 (prep failed)"; return 1; }
  e2e_s44 $plan $ckpt kernels_s47.log no-fold5
}

phase85() {
  # phase 84 on a fresh machine (forty-eighth session: the device budget ended after its default server): the GPU tests
  # of the top-k rows passed in phase 83 (benchmarks/results/gpu_tests_h100_s48_topk.log, the gate's log), so the
  # 1-token plan's checkpoint, then end to end at 1 and 8 requests by default and with MXSERVE_TOPK_GRID=1, each server's
  # requests also timed through SGLang's /generate beside its own e2e_latency (serving.py; ~5 min)
  mkdir -p $res/tests
  cp benchmarks/results/gpu_tests_h100_s48_topk.log $res/tests/
  local plan=benchmarks/plans/qwen15-24l-3.25bit-r0.25-t1-h100-s41.json ckpt=/tmp/w/q15-24-3.25bit-t1
  prep MX_ONLY=1 PLAN=$plan NAME=3.25bit-t1
  [ -f $ckpt/config.json ] || { say "no 24-layer checkpoint 3.25bit-t1 (prep failed)"; return 1; }
  e2e_s44 $plan $ckpt gpu_tests_h100_s48_topk.log no-fold5
}

e2e_t1_gptq() {  # OUT ENV...: the 1-token plan's checkpoint and the GPTQ copy, then serving_runs.sh qwen15-24 at 1, 8
  # and 32 requests into $res/OUT with those settings added (serving_runs.sh's NO_BF16, METRICS_ONLY, FOLD, ...)
  e2e_gptq "$1" benchmarks/plans/qwen15-24l-3.25bit-r0.25-t1-h100-s41.json 3.25bit-t1 "${@:2}"
}

e2e_gptq() {  # OUT PLAN NAME ENV...: e2e_t1_gptq with that plan served (checkpoint /tmp/w/q15-24-NAME)
  prep MX_GPTQ=1 PLAN="$2" NAME="$3"
  [ -f /tmp/w/q15-24-$3/config.json ] || { say "no 24-layer checkpoint $3 (prep failed)"; return 1; }
  env NO_BF16=1 "${@:4}" PLAN="$2" NAME="$3" SGLANG_ARGS="$LEAN_ARGS" \
    benchmarks/serving_runs.sh qwen15-24 $res/$1 > $res/$1.log 2>&1
  say "e2e plan $3 beside the GPTQ copy (${*:4}) rc=$?"
  pkill -f "[s]glang.launch_server" || true
}

phase86() {
  # phase 75's end to end with the grid's top-k rows the default (phase 85: 2798.5 against 2764.9 tokens/s at 8
  # requests, level at 1): the 1-token plan beside the GPTQ copy on Marlin at 1, 8 and 32 requests (~7 min)
  e2e_t1_gptq e2e_s49 MX_GPTQ=1
}

phase87() {
  # phase 86 with the statistics fold out of the timed rounds in a third server (--stats-interval 3600), the GPTQ copy
  # with --enable-metrics (the thirty-ninth session: no cost) so that both servers export SGLang's request histograms,
  # which serving.py reads around each round; then the SGLang stream-K test of DeepSeek-V2, its plan now of the Gluon
  # kernel's schemes alone (~12 min)
  e2e_t1_gptq e2e_fold METRICS_ONLY=1 FOLD=3600
  K=stream_k_decode_serves_in_sglang sglang_tests deepseek_v2
}

phase88() {
  # the shared experts launched early in SGLang, their plan now of the Gluon kernel's schemes alone (forty-ninth
  # session: before, w8a8fp8 and w4a4 in every layer kept decode off the Gluon kernel); both archs side by side
  K=shared_experts_launched_early sglang_tests qwen2_moe deepseek_v2
}

phase89() {
  # phase 87's run with the fold apart by default (phase 87: folded every second in the scheduler's thread, a request
  # that met a fold took up to 16 ms longer; folded hourly, 1.02x at 1 and 8 requests), beside the old thread, then
  # the SGLang tests whose assertions read the series the fold process now writes
  e2e_t1_gptq e2e_apart METRICS_ONLY=1 FOLD_THREAD=1
  K=mixed_checkpoint sglang_tests qwen2_moe deepseek_v2
}

phase90() {
  # phase 89's default server again beside the GPTQ copy with --enable-metrics, on the same machine: a second
  # and third reading of 1 request, where phase 89 gave 1.208x by default (~4 min with phase 89's checkpoints)
  e2e_t1_gptq e2e_repeat METRICS_ONLY=1
}

# the fifty-first session's 3.25-bit plan of w4 and w2 alone (the narrow codes), priced for 1 + 8 tokens
NARROW_PLAN=benchmarks/plans/qwen15-24l-3.25bit-r0.25-narrow-h100-s51.json

phase91() {
  # a plan of the narrow codes alone at 8 requests (fifty-first session: 1.2x the step there needs the MoE section 0.70x
  # the copy's, ours is 0.82x; the layer at 8 tokens under uniform routing took 55 to 59 us on w4 + w2 where 70 to 74 on
  # the 1-token plan's tiers, 37% w3: forty-eighth session): the 3.25-bit plan of w4 and w2 (--schemes w4a16g128,
  # w2a16g128,w1a16g128, priced for 1 + 8 tokens) beside the default 1-token plan and the GPTQ copy with
  # --enable-metrics, at 1, 8 and 32 requests (~9 min)
  e2e_t1_gptq e2e_narrow METRICS_ONLY=1 \
    ALSO_PLAN=$NARROW_PLAN:3.25bit-narrow
}

phase92() {
  # phase 91 with the fortieth session's 8-token plan (50% w2, 47% w4, 2% w3, 1% w8: a few costly blocks, in some
  # layers only) (~9 min)
  e2e_t1_gptq e2e_t8_s40 METRICS_ONLY=1 ALSO_PLAN=benchmarks/plans/qwen15-24l-3.25bit-r0.25-t8-h100-s40.json:3.25bit-t8-s40
}

phase93() {
  # phase 91 cut to what a congested day's budget holds: the narrow plan (w4 + w2) served alone beside the GPTQ copy
  # with --enable-metrics at 1, 8 and 32 requests (no 1-token plan's server: its ratios to the copy are the
  # fifty-first session's three runs) (~6 min)
  e2e_gptq e2e_narrow_only $NARROW_PLAN 3.25bit-narrow METRICS_ONLY=1
}

phase94() {
  # the narrow plan's 8-token forwards take stream-K with the shared experts in the routed launches (fifty-second
  # session: MoE section 56.2 us, router 4.7, gate/up 24.2, of it about 12.3 MB the shared experts', ~4 us at the copy
  # ceiling): the same plan with MXSERVE_SHARED_EARLY=1 (their own launches on a second stream, started as the MoE
  # block starts, beside the router), beside the default and the GPTQ copy with --enable-metrics (~8 min)
  e2e_gptq e2e_narrow_early $NARROW_PLAN 3.25bit-narrow METRICS_ONLY=1 EARLY=1
}

phase95() {
  # the narrow plan's 8-token MoE section (fifty-second session): 56.2 us, of it about 3 us of gaps between its six
  # launches (router, GEMMs, SiLU, top-k sum) and each launch's ramp: the same plan with MXSERVE_PDL=1 (programmatic
  # dependent launches: each launch's programs start while the one before ends), beside the default and the GPTQ
  # copy with --enable-metrics (~8 min fresh, ~5.5 after phase 94 on the same machine)
  e2e_gptq e2e_narrow_pdl $NARROW_PLAN 3.25bit-narrow METRICS_ONLY=1 PDL=1
}

# the fifty-third session's 3.25-bit plan of every weight-only scheme, each layer's 3-bit, 8-bit and bf16 weights kept
# within a tenth (`mxserve plan --keep-stream-k`), priced for 1 + 8 tokens
KEEP_PLAN=benchmarks/plans/qwen15-24l-3.25bit-r0.25-keep-h100-s53.json

phase96() {
  # the decode chain's launches all programmatic now (the Gluon GEMMs too, on the device's Triton 3.6: pdl.gluon_has_it
  # said no there before the fifty-third session): the GPU tests of PDL beside the checkpoints, then the narrow plan by
  # default and with MXSERVE_PDL=1 (BOTH=1: and with it and MXSERVE_SHARED_EARLY=1), beside the GPTQ copy with
  # --enable-metrics, at 1, 8 and 32 requests (~9 min fresh, BOTH=1 ~11; LEAN=1: without the default server, which the
  # fifty-second session timed beside the copy twice, ~6.5 min); without the PDL server where those tests fail
  prep_beside programmatic kernels_pdl.log PLAN=$NARROW_PLAN NAME=3.25bit-narrow || return 1
  if grep -q "passed" $res/tests/kernels_pdl.log && ! grep -q "failed\|error" $res/tests/kernels_pdl.log; then
    e2e_gptq e2e_narrow_pdl $NARROW_PLAN 3.25bit-narrow METRICS_ONLY=1 PDL=1 ${BOTH:+EARLY_PDL=1} ${LEAN:+NO_PLAIN=1}
  else
    say "the PDL tests did not pass: the narrow plan by default and with its shared experts early only"
    e2e_gptq e2e_narrow_early $NARROW_PLAN 3.25bit-narrow METRICS_ONLY=1 EARLY=1
  fi
}

phase97() {
  # after phase 96 on the same machine: the narrow plan with MXSERVE_SHARED_EARLY=1 alone and the plan kept on stream-K
  # (`plan --keep-stream-k`, w3 and w8 within a tenth of each layer), beside the GPTQ copy with --enable-metrics (~6 min)
  e2e_gptq e2e_narrow_early_keep $NARROW_PLAN 3.25bit-narrow METRICS_ONLY=1 NO_PLAIN=1 EARLY=1 \
    ALSO_PLAN=$KEEP_PLAN:3.25bit-keep
}

phase81() {
  # phase 78 gated on phase 80's tests: the 1-token plan's checkpoints, then serving.py at 1 and 8 requests by default,
  # with MXSERVE_TOPK_GRID=1 (the grid's top-k rows at 8 requests: the t1 plan's 37% of costly codes keep 8 tokens off
  # stream-K) and with the statistics folded every 5 s (~6 min)
  local plan=benchmarks/plans/qwen15-24l-3.25bit-r0.25-t1-h100-s41.json ckpt=/tmp/w/q15-24-3.25bit-t1
  prep MX_ONLY=1 PLAN=$plan NAME=3.25bit-t1
  [ -f $ckpt/config.json ] || { say "no 24-layer checkpoint 3.25bit-t1 (prep failed)"; return 1; }
  e2e_s44 $plan $ckpt kernels_s46.log
}

shared_tests() {  # LOG [-k EXPRESSION]: the GPU tests of the shared experts' own launches (against one launch)
  mkdir -p $res/tests
  python3 -m pytest -q -m gpu tests/test_kernels_gpu.py -k "${2:-shared_experts_on_a_second_stream}" -rA -p no:cacheprovider \
    > $res/tests/$1.log 2>&1
  say "GPU tests of the shared experts apart rc=$? $(tail -1 $res/tests/$1.log)"
}

phase63() {
  # the shared experts' launches in blocks of their own rows (Tiles.shared_own, thirty-seventh session): their GPU tests
  # (apart against one launch, bit for bit, eager and in CUDA graphs), then the layer beside every baseline at 16 and 64
  # tokens on the two shapes with shared experts, the layer's block beside it, and off stream-K at 16 tokens (~4 min)
  shared_tests kernels_shared_block
  python3 benchmarks/moe_layer.py --tokens 16 64 --models qwen1.5-moe-a2.7b deepseek-v2-lite \
    --layouts "^(Gluon, held|Gluon, shared experts in the layer's block|no stream-K|no stream-K, shared experts in the layer's block)\$" \
    --plan served=w8a16:1,w4a16g128:5,w3a16g128:11,w2a16g128:7 --out $res/layer_s37_shared > $res/layer_s37_shared.log 2>&1
  say "moe_layer, the shared experts' own block rc=$?"
}

phase64() {
  # the shared experts' launches in 32-row blocks (staged) beside their own picked block (16) and the layer's (8), and
  # every block at 16 rows (the skewed cells' popular experts unpack their weights once for 16 rows, not 8), at 32 and
  # 64 tokens, with its GPU tests (~4 min)
  shared_tests kernels_shared_block32
  python3 benchmarks/moe_layer.py --tokens 32 64 --ours-only --models qwen1.5-moe-a2.7b deepseek-v2-lite qwen3-30b-a3b \
    --layouts "^(Gluon, held|Gluon, BM 16|Gluon, shared experts in (the layer's block|32-row blocks))\$" \
    --plan served=w8a16:1,w4a16g128:5,w3a16g128:11,w2a16g128:7 --out $res/layer_s37_shared32 > $res/layer_s37_shared32.log 2>&1
  say "moe_layer, the shared experts in 32-row blocks rc=$?"
}

phase65() {
  # the layer beside every baseline with the shared experts' own block the default (thirty-seventh session), the layer's
  # block beside it, every shape, 16 and 64 tokens (~4 min; phase 59's run with this session's default)
  python3 benchmarks/moe_layer.py --tokens 16 64 --layouts "^(Gluon, held|Gluon, shared experts in the layer's block)\$" \
    --plan served=w8a16:1,w4a16g128:5,w3a16g128:11,w2a16g128:7 --out $res/layer_s37 > $res/layer_s37.log 2>&1
  say "moe_layer, every baseline, the shared experts' own block rc=$?"
}

phase66() {
  # the shared experts' GPU tests with the started-early stream-K case at 16 tokens (their own 16-row blocks), written
  # after the thirty-seventh session's budget ran out (~1 min)
  shared_tests kernels_shared_early "shared_experts_on_a_second_stream or shared_experts_started_early"
}

phase67() {
  # the shared experts started early (start_shared, MXSERVE_SHARED_EARLY's path), now in blocks of their own rows (16
  # from 13 tokens) on stream-K launches of their own, beside the picked layout where stream-K keeps them in its launch
  # in the routed experts' 8-row blocks: 8, 16 and 32 tokens on the two shapes with shared experts (~2 min)
  python3 benchmarks/moe_layer.py --tokens 8 16 32 --ours-only --models qwen1.5-moe-a2.7b deepseek-v2-lite \
    --layouts '^(Gluon, held|shared experts started early)$' --plan served=w8a16:1,w4a16g128:5,w3a16g128:11,w2a16g128:7 \
    --out $res/layer_s37_early > $res/layer_s37_early.log 2>&1
  say "moe_layer, the shared experts started early rc=$?"
}

two_gpus() {
  local n; n=$(nvidia-smi -L | wc -l)
  [ "$n" -ge 2 ] || { say "issue 14's phases need 2 GPUs; this machine has $n"; return 1; }
  [ -f $WORK/qwen15-4l/config.json ] || python3 benchmarks/random_model.py \
    --config benchmarks/configs/qwen1.5-moe-a2.7b-4layers.json --tokenizer $TOKENIZER --out $WORK/qwen15-4l > /dev/null 2>&1
}

multigpu_tests() {  # -k EXPRESSION: tests/test_sglang_multigpu.py, the Qwen1.5-shaped model among its models
  mkdir -p $res/tests
  MXSERVE_TEST_SGLANG_ARGS="$SMALL --max-total-tokens 16384" MXSERVE_MULTIGPU_MODELS=$WORK/qwen15-4l \
    MXSERVE_TEST_SERVER_LOGS=$res/tests/servers_multigpu.log python3 -m pytest -q -m gpu tests/test_sglang_multigpu.py \
    -k "$1" --basetemp=/tmp/pt_mg -rA -p no:cacheprovider > $res/tests/multigpu_${2:-main}.log 2>&1
  say "two-GPU tests ($1) rc=$? $(tail -1 $res/tests/multigpu_${2:-main}.log)"
}

phase42() {
  two_gpus || return 1
  multigpu_tests "not tiny"
}

phase43() {
  two_gpus || return 1
  LAYERS=4 PART=speed benchmarks/serving_runs.sh multigpu $res/multigpu-4l > $res/multigpu-4l-speed.log 2>&1
  say "one GPU against two, throughput rc=$?"
}

phase44() {
  two_gpus || return 1
  multigpu_tests "tiny" tiny
  LAYERS=4 PART=equal benchmarks/serving_runs.sh multigpu $res/multigpu-4l > $res/multigpu-4l-equal.log 2>&1
  say "one GPU against two, greedy texts rc=$?"
}

phase39() {
  python3 benchmarks/random_model.py --config benchmarks/configs/refmoe-25m.json --tokenizer $TOKENIZER --out /tmp/cm \
    > /dev/null 2>&1
  python3 benchmarks/cold_start.py --model /tmp/cm --plan benchmarks/plans/refmoe-3.25bit.json --out $res/cold \
    --runs plain-cold,mx-cold,mx-warm,plain-warm --warm-rounds 3 > $res/cold.log 2>&1
  say "cold start rc=$?"
}

phase7() {
  sglang_tests qwen2_moe qwen3_moe olmoe mixtral deepseek_v2
  kernel_tests > $res/tests/kernels.log 2>&1
}

case "${1:-}" in
  start)  # PHASE...: the phases to run, in that order; none: go on with the chain running here
    [ -f $res/status.txt ] && exit 0
    shift
    # a follow-up call that lands on a fresh machine (the last one given back) must not start a chain of
    # its own: on 2026-12-04 one ran the old default phases 1 to 7 for 507 s of the budget
    [ $# -gt 0 ] || { echo "no chain runs on this machine (a fresh one?): name the phases to start one" >&2; exit 3; }
    mkdir -p $res
    phases="$*"
    # every function goes to the chain (a list of them left phase 74 out: rc 127 in the forty-third session)
    for p in $phases; do declare -F phase$p > /dev/null || { echo "no phase $p" >&2; exit 2; }; done
    say "chain of phases $phases started on $(nvidia-smi --query-gpu=name --format=csv,noheader)"
    setsid bash -c "source scripts/device_env.sh; $(declare -f);
      res=$res; SMALL='$SMALL'; LEAN_ARGS='$LEAN_ARGS'; for p in $phases; do phase\$p; say \"phase \$p done rc=\$?\"; done;
      say 'chain ended'; touch $res/ended" \
      > $res/chain.log 2>&1 < /dev/null &
    ;;
  wait)
    # packed every minute too: a call cut at the end of the device budget still returns what ran
    pack() { tar czf "${OUT:-/tmp}/results.tgz.part" -C $res --exclude='*.safetensors' . &&
      mv "${OUT:-/tmp}/results.tgz.part" "${OUT:-/tmp}/results.tgz"; }
    t0=$(date +%s)
    while [ ! -f $res/ended ] && [ $(($(date +%s) - t0)) -lt "${2:-560}" ]; do
      sleep 5
      [ $((($(date +%s) - t0) % 60)) -ge 5 ] || pack
    done
    cat $res/status.txt
    pack
    ;;
  *) echo "usage: $0 start [PHASE...] | wait SECONDS" >&2; exit 2 ;;
esac
