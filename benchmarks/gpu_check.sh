#!/usr/bin/env bash
# The GPU check on one CUDA device, from the repository root:
#   bash benchmarks/gpu_check.sh [ARCFACE_TORCH_CHECKOUT]
# (results in $OUT if set, else work_dirs/gpu_check; the checkout may also come from the
# environment variable ARCFACE_TORCH). The default parts take about 5 minutes:
#  1. the host syncs of one otface step (fp16): the dispatch-mode list, by source line;
#  2. our step against upstream arcface_torch's, interleaved in one process (r50, r100), when a
#     checkout is given, with our rows also run with the fused BatchNorm + PReLU ("+fused");
#  3. where an r100 otface step's GPU time goes, by kind of kernel, beside upstream's step;
#  4. train.py's loop against the bare step (throughput ratio, same process, interleaved);
#  5. a 200-step fp16 training run through train.py on synthetic data, checked for n_hard > 0;
#  6. the fused BatchNorm + PReLU against eager cuDNN, per layer shape and per network step;
#  7. the Triton kernels' tests (Sinkhorn, BatchNorm + PReLU), compiled for this GPU;
#  8. the ViTs (vit_t, vit_b): our step against upstream arcface_torch's, interleaved as in 2.,
#     when a checkout is given (about 2 more minutes, not yet timed on a GPU; VIT=0 leaves it
#     out; VIT_KERNELS=auto,triton adds an otface row with the tiled Triton Sinkhorn on the
#     144 x 144 token problems, which "auto" does not pick yet);
# and last, the targets met or missed, as a table (summary.md, by benchmarks/gpu_summary.py).
# EXTRA=1 adds: the CUDA twins of the CPU tests, a torch.compile trial through train.py's loop
# (first step and steady state) and the OT solver against POT and GeomLoss.
# GRAPH=1 adds our rows with the step recorded as a CUDA graph (config.cuda_graph) to 2., the
# loop against the step with it (loop_graph), and its GPU tests against eager training
# (tests_graph, run first). FUSED=0 leaves out the "+fused" rows of 2.
# COMPILE=MODE[,MODE] (e.g. COMPILE=default) adds our rows compiled in those modes to 2.,
# interleaved with upstream's and our eager step; each compiled row pays its compilation in its
# first step (the "first s" column). COMPILE_SCOPE=blocks (default, as config.compile_scope),
# network, or blocks,network; a whole r100 ("network") takes minutes: allow for it.
# Each part has its own time limit, so that one hang cannot take the whole run; ONLY="part
# part" runs just those parts. BUDGET_S=N (e.g. 540 under a 600 s limit) bounds the whole
# run: a part's limit shrinks to what is left, and a part with under 30 s left is skipped, so
# that the summary is always written.
set -uo pipefail
out="${OUT:-work_dirs/gpu_check}"
upstream="${1:-${ARCFACE_TORCH:-}}"
mkdir -p "$out"
export PYTHONPATH="$PWD/plugin${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
budget="${BUDGET_S:-0}"
reserve=15  # seconds kept for the summary
run() {  # run NAME LIMIT_S CMD...: log to $out/NAME.txt, remember a failure, go on
  local name=$1 limit=$2
  shift 2
  # ONLY="name1 name2" runs just those parts (a rerun of what failed).
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
  if [ "$budget" -gt 0 ]; then
    local left=$((budget - SECONDS - reserve))
    if [ "$left" -lt 30 ]; then
      echo "== $name: skipped, ${left}s of BUDGET_S=$budget left"
      echo "budget" > "$out/$name.rc"
      : > "$out/$name.txt"
      return
    fi
    [ "$left" -lt "$limit" ] && limit=$left
  fi
  echo "== $name ($(date +%T), limit ${limit}s): $*"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt"
  local rc=${PIPESTATUS[0]}
  echo "$rc" > "$out/$name.rc"
  [ "$rc" -eq 0 ] || { echo "!! $name failed ($rc)"; status=1; }
}
common=(--device cuda --batch-size 128 --fp16 --num-classes 93431)

run env 30 python -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))"
if [ -n "${GRAPH:-}" ]; then
  run tests_graph 120 python -m pytest -m gpu tests/test_graph.py
fi
run sync_debug 90 python benchmarks/bench_step.py "${common[@]}" --network r50 --sync-debug
compiled=()
vs_limit=150
variants=()
[ "${FUSED:-1}" = "0" ] || variants+=(--fused-bn-prelu)
[ -n "${GRAPH:-}" ] && variants+=(--cuda-graph)
if [ -n "${COMPILE:-}" ]; then
  compiled=(--compile "$COMPILE" --compile-scope "${COMPILE_SCOPE:-blocks}")
  vs_limit=420
fi
if [ -n "$upstream" ]; then
  for net in r50 r100; do
    run "vs_upstream_$net" "$vs_limit" python benchmarks/bench_step.py "${common[@]}" \
      --network "$net" --arcface-torch "$upstream" --warmup 5 --blocks 20 --block-steps 5 \
      "${variants[@]}" "${compiled[@]}"
  done
else
  echo "== vs_upstream: skipped (give an arcface_torch checkout as the first argument)"
fi
beside=()
[ -n "$upstream" ] && beside=(--arcface-torch "$upstream")
run profile_r100 120 python benchmarks/profile_step.py "${common[@]}" --network r100 \
  --loss otface --steps 5 --warmup 5 "${beside[@]}"
loop=(python benchmarks/bench_loop.py --device cuda --network r50 --loss otface --batch-size 128
  --fp16 --num-classes 93431 --num-workers 12 --blocks 4 --block-steps 20)
run loop_vs_step 120 "${loop[@]}"
if [ -n "${GRAPH:-}" ]; then
  run loop_graph 120 "${loop[@]}" --cuda-graph on
fi

cfg_dir=$(mktemp -d)
cat > "$cfg_dir/gpu_check_r50_otface.py" <<'CFG'
from easydict import EasyDict as edict

config = edict()
config.loss = "otface"
config.network = "r50"
config.fp16 = True
config.rec = "synthetic"
# 8 images per identity: with one, the P x K sampler repeats an image and nothing is hard.
# Look-alike families keep hard triplets in the batches after the first hundred steps.
config.num_classes = 3200
config.num_image = 128 * 200
config.num_epoch = 1
config.batch_size = 128
config.frequent = 20
config.verbose = 100000
config.val_targets = []
config.num_workers = 12
config.sampler = edict(type="pk", k=4)
config.output = "work_dirs/gpu_check_r50_otface"
CFG
rm -rf work_dirs/gpu_check_r50_otface
run train 180 python train.py "$cfg_dir/gpu_check_r50_otface"
cp work_dirs/gpu_check_r50_otface/training.log "$out/training.log" 2>/dev/null
run train_n_hard 10 python - "$out/training.log" <<'PY'
import re, sys
values = [float(v) for v in re.findall(r"n_hard (\S+)", open(sys.argv[1]).read())]
print(f"log lines with n_hard: {len(values)}; n_hard min {min(values)}, max {max(values)}")
sys.exit(0 if values and min(values) > 0 else "n_hard was 0 on some log line: the OT term idled")
PY

run bn_prelu 120 python benchmarks/bench_bn_prelu.py
# (pyproject's addopts already has -q; a second -q would drop the counts the summary reads)
run tests_triton 180 python -m pytest tests/test_ot_triton.py tests/test_fused_bn_prelu.py
if [ "${VIT:-1}" != "0" ]; then
  if [ -n "$upstream" ]; then
    for net in vit_t vit_b; do
      run "vs_upstream_$net" 150 python benchmarks/bench_step.py "${common[@]}" \
        --network "$net" --arcface-torch "$upstream" --warmup 5 --blocks 10 --block-steps 5 \
        --ot-kernels "${VIT_KERNELS:-auto}"
    done
  else
    echo "== vs_upstream_vit: skipped (give an arcface_torch checkout as the first argument)"
  fi
fi
if [ -n "${EXTRA:-}" ] || [ -n "${ONLY:-}" ]; then  # ONLY picks among all parts
  run tests 240 python -m pytest -m gpu tests/test_gpu.py tests/test_prefetch.py
  run compile_r50 240 python benchmarks/bench_loop.py --device cuda --network r50 \
    --loss otface --batch-size 128 --fp16 --num-classes 93431 --num-workers 12 --blocks 2 \
    --block-steps 20 --compile default
  run bench_ot 90 python benchmarks/bench_ot.py --device cuda
fi
# The targets, met or not, from the logs above (parts of earlier runs into the same folder
# included, so that an ONLY= rerun completes the table).
python benchmarks/gpu_summary.py "$out" | tee "$out/summary.md"
exit $status
