#!/bin/sh
# Every measurement in docs/performance.md, in order (26-90 minutes on the 2-core development hosts;
# the comparisons first, while the host is quietest). The bench grids visit every configuration 3
# times (fresh deployments, medians of the visits): a slow stretch of this shared VM moves one visit;
# the llama.cpp comparison visits both engines 3 times, alternately, and compares their medians.
# Writes benchmarks/results/bench_cpu_*.json, the decode plot and the two comparisons' JSON.
# MESHLM_HOME (default ~/.cache/meshlm) decides where the calibration goes and what bench reads.
set -e
cd "$(dirname "$0")/.."
R=benchmarks/results
mkdir -p $R
uptime
meshlm calibrate
uptime
python benchmarks/decode_attention.py --batch 1,8,16 --context 128,1088
uptime
python benchmarks/vs_llamacpp.py --batch 1,8 --prompt-len 128 --gen-len 64 --repeats 2 --visits 3
uptime
python benchmarks/vs_transformers.py --batch 1 --prompt-len 128 --gen-len 64 --repeats 2
uptime
meshlm bench --batch 8 --input-len 512 --gen-len 64 --quantize none,int8 --repeats 1 --visits 3 \
    --json $R/bench_cpu_prefill.json
uptime
meshlm bench --batch 1,4,16,64 --input-len 16,128 --gen-len 64 --quantize none,int8 --repeats 1 --visits 3 \
    --json $R/bench_cpu_grid.json --plot $R/bench_cpu_decode.png
uptime
meshlm bench --batch 1,4,16 --input-len 1024 --gen-len 64 --quantize none,int8 --kv-cache auto,bf16 \
    --repeats 1 --visits 3 --json $R/bench_cpu_long.json
uptime
