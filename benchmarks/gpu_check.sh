#!/usr/bin/env bash
# The GPU check, in one run of a few minutes on one CUDA device, from the repository root:
#   bash benchmarks/gpu_check.sh            (results in $OUT if set, else work_dirs/gpu_check)
# 1. the CUDA twins of the CPU tests; 2. the OT solver against POT and GeomLoss; 3. the
# OTFace step overhead on r100 and r50 (fp16, batch 128, MS1MV3's 93,431 classes);
# 4. a short fp16 training run through train.py on synthetic data; 5. the fused Triton
# Sinkhorn kernel's tests compiled for the device, and the host syncs of one otface step.
set -uo pipefail
out="${OUT:-work_dirs/gpu_check}"
mkdir -p "$out"
export PYTHONPATH="$PWD/plugin${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
run() {  # run NAME CMD...: log to $out/NAME.txt, remember a failure, go on
  local name=$1
  shift
  echo "== $name: $*"
  "$@" 2>&1 | tee "$out/$name.txt"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "!! $name failed ($rc)"; status=1; }
}

run env python -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))"
run tests python -m pytest -q -m gpu tests/test_gpu.py
run tests_triton python -m pytest -q tests/test_ot_triton.py
run bench_ot python benchmarks/bench_ot.py --device cuda
run sync_debug python benchmarks/bench_step.py --device cuda --network r50 --batch-size 128 \
  --fp16 --num-classes 93431 --sync-debug
for net in r100 r50; do
  run "bench_step_$net" python benchmarks/bench_step.py --device cuda --network "$net" \
    --batch-size 128 --fp16 --num-classes 93431 --ot-kernels auto,torch,matmul,triton
done

cfg_dir=$(mktemp -d)
cat > "$cfg_dir/gpu_check_r50_otface.py" <<'CFG'
from easydict import EasyDict as edict

config = edict()
config.loss = "otface"
config.network = "r50"
config.fp16 = True
config.rec = "synthetic"
# 8 images per identity: with one, the P x K sampler repeats an image and nothing is hard.
config.num_classes = 3200
config.num_image = 128 * 200
config.num_epoch = 1
config.batch_size = 128
config.frequent = 20
config.verbose = 100000
config.val_targets = []
config.num_workers = 4
config.sampler = edict(type="pk", k=4)
config.output = "work_dirs/gpu_check_r50_otface"
CFG
run train python train.py "$cfg_dir/gpu_check_r50_otface"
cp work_dirs/gpu_check_r50_otface/training.log "$out/training.log" 2>/dev/null
exit $status
