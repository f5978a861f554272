#!/usr/bin/env bash
# Everything a lent GPU session checks, as one script (each step time-boxed; logs land in $OUT).
#
#   bash bench/gpu_session.sh            # on a CUDA machine, from the repository root
#
# The machine's own python3 (with torch) is used; hydra-core/omegaconf/antlr4/torch-fidelity, which such an
# image may lack, can be put (pure Python) in ./.gpu_site, which is added to PYTHONPATH.
set -u
OUT=${OUT:-gpu_session_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD/.gpu_site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PY:-python3}
step() {  # step NAME SECONDS CMD...: run, time-boxed, log to $OUT/NAME.log, never abort the script
    local name=$1 secs=$2
    shift 2
    echo "=== $name (limit ${secs}s): $*"
    local t0=$SECONDS
    timeout "$secs" "$@" >"$OUT/$name.log" 2>&1
    echo "=== $name rc=$? in $((SECONDS - t0))s"
    tail -n 25 "$OUT/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
$PY -c "import torch, lightning, hydra; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'lightning', lightning.__version__, 'hydra', hydra.__version__)"

# 1. images/s per paper model: TF32 baseline, then bf16 autocast + channels_last (what trainer=gpu uses)
MODELS="ddpmpp ddpmpp_deep ncsnpp ncsnpp_deep"
step bench_tf32 100 $PY bench/train_step.py --models $MODELS --batch 128 --steps 10 --warmup 3
step bench_bf16 100 $PY bench/train_step.py --models $MODELS --batch 128 --steps 10 --warmup 3 --amp bf16 --channels-last
# 2. correctness of the speed options on CUDA (fp64 device vs CPU, SDPA, channels_last, bf16, compile, ODE oracle)
step pytest_gpu 120 $PY -m pytest -q -p no:cacheprovider -m gpu tests/gpu
# 3. the default run (digits, 1500 steps, whole-test-split ODE + bound) end to end on the GPU
rm -rf /tmp/run_gpu
step train_default 150 $PY train.py trainer=gpu hydra.run.dir=/tmp/run_gpu
cp /tmp/run_gpu/metrics.json "$OUT/train_default_metrics.json" 2>/dev/null
# 4. torch.compile on top (compile time, ~100 s per model, is part of the warm-up steps): fp32/TF32, then bf16
step bench_compile_tf32 200 $PY bench/train_step.py --models ddpmpp --batch 128 --steps 10 --warmup 3 --compile
step bench_compile_bf16 200 $PY bench/train_step.py --models ddpmpp --batch 128 --steps 10 --warmup 3 --amp bf16 --compile
