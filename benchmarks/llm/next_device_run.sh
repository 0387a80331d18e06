#!/usr/bin/env bash
# Runs L1 and L2 of 2026-11-23 (docs/llm-runs.md, "runs L1-L5"), kept so they can be repeated:
# the measurements that section's "Next device run" asked for then, in two device calls of under 10 minutes
# each (the device tool's limit; each step under its own timeout, so one that hangs leaves the others their
# time). From the repository root, with the wheels carried in .whl/:
#
#     bash benchmarks/llm/next_device_run.sh kernels    # 1 and 2, ~8 minutes
#     bash benchmarks/llm/next_device_run.sh server     # 3 and 4, ~9 minutes; results and logs under $OUT
#     bash benchmarks/llm/next_device_run.sh int4-speed    # ran in M2 (timed out after two of three recipes)
#     bash benchmarks/llm/next_device_run.sh int4-quality  # not run: M2 settled the recipe (llm-runs.md M2)
#     bash benchmarks/llm/next_device_run.sh int4-ring     # ran as N2 (llm-runs.md)
#     bash benchmarks/llm/next_device_run.sh int4-ncu      # rings against whole K ranges (after N9)
#
# 1. split-K for the down product (gemv.SPLIT_K 1 / 2 / 4), int8 and bf16, batch-1 graphs, twice in turn;
# 2. what the decode attention costs inside the int8 / bf16 batch-1 chain (the call skipped, timing only):
#    the most that fusing it into the q/k/v product could save;
# 3. the 64 x 128/128 engine and server figures with prefix caching on (the default) and off, one call;
# 4. Nsight Compute of the int4 batch-1 graph (K1 ran out of time before it).
set -u
source .whl/install-wheels.sh >/dev/null 2>&1
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 INFERFORGE_CACHE=$PWD/.whl/ifcache
OUT=${OUT:-/tmp/next_device_run}
mkdir -p "$OUT"

if [ "${1:-}" = kernels ]; then
timeout 300 python benchmarks/llm/bench_decode.py --sections splitdownab --quants int8,bf16 \
    > "$OUT/splitdownab.log" 2>&1
echo "splitdownab rc=$?"; grep -E "graph replay" "$OUT/splitdownab.log" | tail -14

timeout 170 python benchmarks/llm/bench_decode.py --sections noattnab > "$OUT/noattnab.log" 2>&1
echo "noattnab rc=$?"; grep -E "graph replay" "$OUT/noattnab.log" | tail -8
elif [ "${1:-}" = server ]; then
timeout 200 ncu --profile-from-start off --clock-control none --graph-profiling node --section SpeedOfLight \
    --section Occupancy --section LaunchStats --csv --page details \
    python benchmarks/llm/ncu_decode.py --quants int4 > "$OUT/ncu_int4.csv" 2> "$OUT/ncu_int4.err"
echo "ncu int4 rc=$?"; python benchmarks/llm/ncu_decode.py --summarize "$OUT/ncu_int4.csv" > "$OUT/ncu_int4.json"
for P in prefix-caching no-prefix-caching; do
    timeout 170 python benchmarks/serve_openai/bench_server.py --budget-s 60 --max-num-batched-tokens 8192 \
        --client-procs 16 --reps 2 --waves 6 --variants process:5:4 --ttft-reps 10 --$P \
        --json "$OUT/server_$P.json" > "$OUT/server_$P.log" 2>&1
    echo "server $P rc=$?"; grep -E "waves: |closed loop: |TTFT 512" "$OUT/server_$P.log" | grep -v "^\["
done
elif [ "${1:-}" = int4-speed ]; then  # staged after L5: int4 recipes, batch-1 graphs (~5 minutes)
timeout 420 python benchmarks/llm/bench_decode.py --sections int4recipeab > "$OUT/int4recipe.log" 2>&1
echo "int4recipeab rc=$?"; grep -E "graph replay" "$OUT/int4recipe.log" | sort -u
elif [ "${1:-}" = int4-quality ]; then  # staged after L5: their perplexity on the own model (~6 minutes)
timeout 540 python benchmarks/llm/train_small_llama.py --formats bf16,int4,int4-g128,int4-head8 \
    > "$OUT/int4quality.log" 2>&1
echo "train_small_llama rc=$?"; grep -E "perplexity" "$OUT/int4quality.log"
elif [ "${1:-}" = int4-ring ]; then  # staged after M7: the ring variant, alone and in the step (~8 min)
timeout 150 python benchmarks/llm/bench_int4_tc.py --sections accuracy,micro > "$OUT/int4ring_kernels.log" 2>&1
echo "kernels rc=$?"; grep -E "^(accuracy|o |w2 |qkv )" "$OUT/int4ring_kernels.log"
timeout 400 python benchmarks/llm/bench_decode.py --sections int4tcringab > "$OUT/int4ring.log" 2>&1
echo "int4tcringab rc=$?"; grep -E "graph replay|not used" "$OUT/int4ring.log" | sort | uniq -c
elif [ "${1:-}" = int4-ncu ]; then  # staged after M7, rewritten after N9: why a ring streams faster (~7 min)
# Nsight Compute of the int4 step as it runs (gate/up, the LM head and down on rings of 4), then with the
# same tiles holding their whole K range in shared memory (M4-M6's): DRAM throughput, occupancy, warp stalls
# and memory workload per kernel, side by side (N9: the rings make each kernel shorter, with the same
# programs an SM and the same overlap with its neighbours).
NCU="ncu --profile-from-start off --clock-control none --graph-profiling node --section SpeedOfLight
     --section Occupancy --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis
     --csv --page details"
timeout 250 $NCU python benchmarks/llm/ncu_decode.py --quants int4 > "$OUT/ncu_int4_rings.csv" 2> "$OUT/ncu_int4_rings.err"
echo "ncu rings rc=$?"
timeout 250 $NCU python benchmarks/llm/ncu_decode.py --quants int4 \
    --int4-tc 16384x2048=4x8,128256x2048=4x8,2048x8192=1x16 > "$OUT/ncu_int4_whole.csv" 2> "$OUT/ncu_int4_whole.err"
echo "ncu whole ranges rc=$?"
for f in ncu_int4_rings ncu_int4_whole; do
    python benchmarks/llm/ncu_decode.py --summarize "$OUT/$f.csv" > "$OUT/$f.json"
done
else
    echo "usage: $0 kernels|server|int4-speed|int4-quality|int4-ring|int4-ncu" >&2; exit 2
fi
