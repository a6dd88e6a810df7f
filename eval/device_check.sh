#!/usr/bin/env bash
# The GPU checks in one call of a lent CUDA machine (see README, "On a GPU"): the CUDA tests, then decode
# speed and memory of the main settings on a random-weight Llama-3.1-8B shape (batch 1) and a Llama-3.2-1B
# shape (16 rows, where the cache outweighs the model), in bfloat16. Logs and JSON go to $OUT.
#
#   OUT=/tmp/out bash eval/device_check.sh
#
# It expects the machine's own torch; transformers of the pinned range may come as a wheel in .whl/.
# TEST_TIMEOUT and BENCH_TIMEOUT bound the parts (on an H200 the tests took 125 s, the 8B run at 8k about
# 100 s, at 32k longer); RUN_8B=0 leaves out the 8B run (LENGTHS_8B its lengths), BATCH_RUN=0 the 16-row
# run, TESTS names other test files. Each benchmark also profiles one decoding step per cache (kernels
# launched and their device time against the step's wall time).
set -u
OUT=${OUT:-/tmp/hf-kvcache-device}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    | tee -a "$OUT/gpu.txt"

# Built once here, so that the test workers do not each compile the CPU kernel the CPU references use.
python3 -c "from hf_kvcache.kernels.build import load_library; load_library()" || echo "no CPU kernel"
timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider -n 8 ${TESTS:-tests/test_cuda.py tests/test_triton_attention.py} -rf 2>&1 \
    | tee "$OUT/test_cuda.log" | tail -25

SETTINGS=(
    "full"
    "quantized:nbits=4"
    "quantized:nbits=2"
    "quantized:nbits=2,nbits_keys=3,group_size=64,residual_length=0,rotation=hadamard"
    "quantized:nbits=2,nbits_keys=3,group_size=64,residual_length=0,rotation=hadamard,keys=pre_rope"
    "sliding-window:window_length=2048,num_sink_tokens=4"
    # prompt=none: a random-weight model has no tokenizer to write kvzip's reconstruction prompt with.
    "kvzip:budget=0.25,prompt=none"
    "kvzip:budget=0.5,prompt=none+quantized:nbits=4,nbits_keys=8,rotation=hadamard-values"
)
if [ "${BATCH_RUN:-1}" = 1 ]; then
    # attention=torch: the torch sums the Triton kernels replace on CUDA, measured in the same rounds;
    # attention=triton on pre-RoPE keys: the Triton RoPE kernel, which attention=auto does not take yet.
    timeout "${BENCH_TIMEOUT:-150}" python3 eval/bench_decode.py --device cuda --dtype bfloat16 --profile \
        --geometry llama-3.2-1b --batch 16 --lengths 32768 --rounds 3 --steps 10 --chunk-size 2048 \
        --strategies "${SETTINGS[@]:0:5}" "quantized:nbits=2,attention=torch" "${SETTINGS[4]},attention=triton" \
        --out "$OUT/decode_cuda_1b_batch16.json" 2>"$OUT/bench_1b.err"
    tail -3 "$OUT/bench_1b.err"
fi
if [ "${RUN_8B:-1}" = 1 ]; then
    timeout "${BENCH_TIMEOUT:-220}" python3 eval/bench_decode.py --device cuda --dtype bfloat16 --profile \
        --geometry llama-3.1-8b --lengths ${LENGTHS_8B:-8192 32768} --rounds 3 --steps 10 --chunk-size 4096 \
        --strategies "${SETTINGS[@]}" "snapkv:budget=0.25" --out "$OUT/decode_cuda_8b.json" 2>"$OUT/bench_8b.err"
    tail -3 "$OUT/bench_8b.err"
fi
