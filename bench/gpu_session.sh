#!/usr/bin/env bash
# Everything a lent GPU session checks, as one script (each step time-boxed; logs land in $OUT).
#
#   bash bench/gpu_session.sh            # on a CUDA machine, from the repository root
#
# The machine's own python3 (with torch) is used; hydra-core/omegaconf/antlr4, which such an image may lack, can be
# put (pure Python) in ./.gpu_site, which is added to PYTHONPATH; a default-run checkpoint in .gpu_site/ckpt/last.ckpt.
# Issue 10 (ODE likelihood speed) and issue 12 (the training step's MFU levers). Without a mode: the likelihood
# benchmarks and the bare training step (<= 510 s of steps; CUDA graphs in a second call with ALSO_CUDAGRAPHS=1).
# Issue 12's open points: TRAIN_PY=1 then TRAIN_PY=2, two calls back to back on the warm machine. With 900 s of
# device time: the start (~40 s), call 1 with DEADLINE=560 (~560 s: its boxes, each a compilation of ~2 min and the
# timed steps; timeout_s=590), then call 2 with DEADLINE set to what is left minus ~30 s (e.g. DEADLINE=260,
# timeout_s=280): the steps of each call run in order of importance and shrink (or are skipped) to fit.
# BF16_CHECK=1 runs the bf16 check alone, GPU_TESTS=1 `pytest -m gpu tests/gpu`. Every step is time-boxed with
# `timeout -k 20`: a signal only asks train.py to stop at the end of its step.
set -u
OUT=${OUT:-gpu_session_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD/.gpu_site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PY:-python3}
DEADLINE=${DEADLINE:-0}  # seconds after the start by which every step has ended (0: none); set it to what the
# session's device time leaves, so that each box shrinks to fit and a step left with under 45 s is skipped
box() {  # box SECONDS: SECONDS, or less to end 25 s before DEADLINE (timeout's -k 20, then the exit); 0: no time
    local secs=$1 left
    if [ "$DEADLINE" -gt 0 ]; then
        left=$((DEADLINE - SECONDS - 25))
        if [ "$left" -lt "$secs" ]; then secs=$left; fi
        if [ "$secs" -lt 45 ]; then secs=0; fi
    fi
    echo "$secs"
}
step() {  # step NAME SECONDS CMD...: run, time-boxed, log to $OUT/NAME.log, never abort the script
    local name=$1 secs
    secs=$(box "$2")
    shift 2
    if [ "$secs" -le 0 ]; then
        echo "=== $name skipped: DEADLINE=${DEADLINE}s leaves too little at ${SECONDS}s"
        return
    fi
    echo "=== $name (limit ${secs}s): $*"
    local t0=$SECONDS
    timeout -k 20 "$secs" "$@" >"$OUT/$name.log" 2>&1  # -k: a signal only asks train.py to stop at the step end
    echo "=== $name rc=$? in $((SECONDS - t0))s"
    grep -v -i warn "$OUT/$name.log" | tail -n 14
}

bf16_check() {  # issue 12: the default run in fp32 and in bf16-mixed on the GPU, seeds 42 and 1 (the seed change is
    # the noise floor), then the test bits/dim paired per image (README "Does bf16 training change the bits/dim?"). The
    # default run's small network leaves the GPU mostly idle (host-bound, about 20 steps/s on the 2026-11-26 H200), so
    # the four runs share it concurrently, each within BF16_BOX seconds.
    local b
    b=$(box "${BF16_BOX:-270}")
    if [ "$b" -le 0 ]; then
        echo "=== bf16 check skipped: DEADLINE=${DEADLINE}s leaves too little at ${SECONDS}s"
        return
    fi
    for seed in 42 1; do
        for prec in 32-true bf16-mixed; do
            (timeout -k 20 "$b" $PY train.py trainer=gpu trainer.precision=$prec seed=$seed \
                hydra.run.dir="$OUT/s${seed}_$prec" extras.print_config=false ${BF16_EXTRA:-} >"$OUT/s${seed}_$prec.log" 2>&1
             echo "=== s${seed}_$prec rc=$? at ${SECONDS}s") &
        done
    done
    wait
    for f in "$OUT"/s*.log; do echo "--- $f"; grep -A9 "== test split" "$f" || tail -n 5 "$f"; done
    $PY bench/compare_runs.py "$OUT/s42_32-true" "$OUT/s42_bf16-mixed" "$OUT/s1_32-true" "$OUT/s1_bf16-mixed" \
        | tee "$OUT/bf16_check.txt"
    $PY bench/compare_runs.py "$OUT/s1_32-true" "$OUT/s1_bf16-mixed"
}
speed() {  # speed RUN_DIR: the run's train/* summary; a run cut off by its time box: its last logged windows
    $PY - "$1" <<'PYEOF' || true
import csv, json, sys
from pathlib import Path
run = Path(sys.argv[1])
if (run / "metrics.json").is_file():
    m = json.loads((run / "metrics.json").read_text())
    print("SPEED", run, {k: m[k] for k in m if k.startswith("train/")})
elif (run / "csv" / "metrics.csv").is_file():
    rows = [r for r in csv.DictReader(open(run / "csv" / "metrics.csv")) if r.get("train/img_per_s")]
    print("SPEED (cut off; windows: step, img/s, mfu)", run,
          [(r["step"], r["train/img_per_s"], r.get("train/mfu")) for r in rows[-4:]])
else:
    print("SPEED", run, "no metrics: the run logged no window")
PYEOF
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
if [ "${GPU_TESTS:-0}" = 1 ]; then  # the GPU tests alone (pytest must be importable by $PY; .gpu_site may hold it)
    step pytest_gpu 300 $PY -m pytest -q -p no:cacheprovider -m gpu tests/gpu
    exit 0
fi
if [ "${BF16_CHECK:-0}" = 1 ]; then  # the bf16 check alone
    bf16_check
    exit 0
fi
if [ "${TRAIN_PY:-0}" != 0 ]; then  # issue 12, two calls of <= 590 s each, back to back on the warm machine. Measured
    # on an H200 2026-11-28 (bench/results/h200-2026-11-28b/): speed=gpu (bf16 + CUDA graphs + fused + on_device)
    # 2806 img/s = 18.5 % MFU, Inductor's default mode 993 img/s, the bf16 check. What is left, each a lever on top of
    # speed=gpu, one run each (the real train.py on CIFAR-10-shaped data: random pixels in the official layout;
    # images/s, TFLOP/s and MFU after 20 warm-up steps; the compile cache under outputs/ is shared by the runs):
    # TRAIN_PY=1: (a) speed=gpu at batch 128, that machine's baseline; (b) cuDNN's convolution autotuning
    #   (trainer.benchmark=true: Lightning leaves torch.backends.cudnn.benchmark off, bench/train_step.py turns it
    #   on; the same shapes as (a), so its compilation comes from the cache); (c) batch 256 (the larger-batch lever).
    # TRAIN_PY=2: (p) where the compiled step's device time goes (bench/profile_step.py: the kernels of speed=gpu's
    #   bare step, by kind, and the ceiling if all but the convolutions and GEMMs were fused away: which lever is left);
    #   (d) speed=gpu with the DataLoader (4 workers, pinned copies) instead of on_device (that lever alone); (e)
    #   channels_last under CUDA graphs; (f) the bare step (bench/train_step.py) with CUDA graphs; (g) the host time
    #   per batch of both data paths (bench/data_loading.py); then the bf16 check again if DEADLINE leaves time
    #   (BF16_CHECK=1 runs it alone).
    $PY -c "import sys; sys.path.insert(0, 'bench'); from pathlib import Path; from table2_throughput import write_cifar
write_cifar(Path(sys.argv[1]), 10000)" "$OUT/fakecifar"
    common="experiment=cifar10_table2 data.root=$OUT/fakecifar val_every=100000 sample_every=100000
        checkpoint_every=100000 test=false module.evaluation.nll_every=0 trainer.num_sanity_val_steps=0
        extras.print_config=false speed=gpu ${TRAIN_EXTRA:-}"
    if [ "$TRAIN_PY" = 1 ]; then
        step train_speed_gpu 200 $PY train.py $common trainer.max_steps=400 hydra.run.dir="$OUT/train_speed_gpu"
        speed "$OUT/train_speed_gpu"
        step train_speed_gpu_cudnn_benchmark 120 $PY train.py $common trainer.max_steps=350 trainer.benchmark=true \
            hydra.run.dir="$OUT/train_speed_gpu_cudnn_benchmark"
        speed "$OUT/train_speed_gpu_cudnn_benchmark"
        step train_speed_gpu_b256 175 $PY train.py $common trainer.max_steps=200 datamodule.batch_size=256 \
            hydra.run.dir="$OUT/train_speed_gpu_b256"
        speed "$OUT/train_speed_gpu_b256"
    else
        step profile_compiled 240 $PY bench/profile_step.py --model ddpmpp --batch 128 --amp bf16 --compile \
            --fused-adam --ema --rows 30
        step train_speed_gpu_dataloader 170 $PY train.py $common trainer.max_steps=400 datamodule.on_device=false \
            hydra.run.dir="$OUT/train_speed_gpu_dataloader"
        speed "$OUT/train_speed_gpu_dataloader"
        step train_speed_gpu_channels_last 175 $PY train.py $common trainer.max_steps=300 module.channels_last=true \
            hydra.run.dir="$OUT/train_speed_gpu_channels_last"
        speed "$OUT/train_speed_gpu_channels_last"
        step train_step_bf16_cudagraphs_fused 200 $PY bench/train_step.py --models ddpmpp --batch 128 --steps 20 \
            --warmup 3 --amp bf16 --compile --compile-mode reduce-overhead --fused-adam --ema ${TRAIN_STEP_EXTRA:-}
        step data_loading 40 $PY bench/data_loading.py --batches 200
        bf16_check
    fi
    exit 0
fi
$PY -c "import torch, lightning, hydra; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'lightning', lightning.__version__, 'hydra', hydra.__version__)"

# 1. ODE bits/dim, reference method vs ours: DDPM++ (random weights, non-zero output conv) at CIFAR-10 shape
step lik_ddpmpp 150 $PY bench/likelihood_speed.py --gpu-model ddpmpp --device cuda --num-images 32 --tight 1e-6 \
    --ours dopri5@1e-5,rk4#10,rk4#20,rk4#40,exp_pc3#20,exp_pc3#40,exp_pc3#60 --json "$OUT/lik_ddpmpp.json"
# 2. the same on the default run's trained checkpoint, batch 128
if [ -f .gpu_site/ckpt/last.ckpt ]; then
step lik_ckpt 120 $PY bench/likelihood_speed.py --ckpt .gpu_site/ckpt/last.ckpt --device cuda --num-images 64 --tight 1e-6 \
    --ours dopri5@1e-5,rk4#40,rk4#50,exp_pc3#50,exp_pc3#60,exp_pc3#70 --json "$OUT/lik_ckpt.json"
fi
# 3. training step of ddpmpp at batch 128 (issue 12): bf16 + compile + fused Adam + fused EMA, then CUDA graphs on top
step train_compile 240 $PY bench/train_step.py --models ddpmpp --batch 128 --steps 20 --warmup 3 --amp bf16 \
    --compile --fused-adam --ema
if [ "${ALSO_CUDAGRAPHS:-0}" = 1 ]; then  # a second call: the steps above already take ~510 s of a 600 s call
step train_cudagraphs 240 $PY bench/train_step.py --models ddpmpp --batch 128 --steps 20 --warmup 3 --amp bf16 \
    --compile --compile-mode reduce-overhead --fused-adam --ema
fi
