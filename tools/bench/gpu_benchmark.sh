#!/usr/bin/env bash
# ShapeMask on one GPU (JAX backend) against torchvision's Mask R-CNN, in one
# run of at most ~8 minutes:
#   - ShapeMask R101-FPN, 1024x1024, mixed_bfloat16: training images/s at
#     batch 8, 16 and 32 of the step `KERAS_BACKEND=jax python train.py`
#     runs (official_shapemask.training.jax_step.TrainStep) on a synthetic
#     batch kept on the device; inference ms/image at batch 1 and 8 with the
#     engine's evaluation step (post-processing and mask branch included);
#     every number with the step's FLOPs (XLA cost analysis of the compiled
#     step), TFLOP/s and MFU against GPU_BENCH_PEAK_TFLOPS (default 790, the
#     H200's measured bf16 matrix-product rate);
#   - A/B extras (when the budget allows: they compile at a lower CPU
#     priority, and the main measurements do not wait for them): training
#     at batch 16 with the batch norm as it was before issue 20 (float32
#     input copy, matmul channel sums), with only its float32 copy (sums as
#     reductions), and with Keras' own batch norm; inference at batch 1
#     with the NMS loop as it was before issue 20 (early exit: the step of
#     the 14.1 ms of 2026-12-04), with that loop and the batch norms not
#     folded into the convolutions (the step of the 10.6 ms of 2026-11-28),
#     and with 1000 instead of 5000 per-class candidates before NMS (how
#     much the top-k costs);
#   - the input pipeline apart: training-parser images/s on the host CPUs
#     (tools/bench/benchmark_input.py), when TensorFlow is importable;
#   - torchvision maskrcnn_resnet50_fpn, 1024x1024, bf16 autocast: training
#     images/s at batch 8 and 16 (eager), channels_last at batch 8, and
#     channels_last + torch.compile of the backbone at batch 8 (random
#     weights, synthetic targets), each with its FLOPs and MFU.
# Every measurement is a subprocess of tools/bench/benchmark.py with its own
# timeout, so one failure (say, out of memory at batch 32) keeps the rest.
# The eager torchvision runs go first, alone (their steps are sensitive to
# host load); then ours and torch.compile all compile at once (XLA
# compilation is CPU work, ~4 min for R101 at 1024 on the H200 machine) and
# take turns on the GPU for their timed steps (a file lock). Results: JSON
# lines on stdout and in $OUT/gpu_benchmark.jsonl (when OUT is set), a table
# at the end, the worker logs in $OUT/worker_logs.tar.gz.
#
# The accelerator image lacks Keras, optree, namex and gin-config: carry
# them as wheels in .whl/ (see docs/benchmarks.md for the pip download
# command); they are installed into /tmp/site when `import keras` fails.
#
# Usage:
#   bash tools/bench/gpu_benchmark.sh              # the GPU run
#   bash tools/bench/gpu_benchmark.sh --cpu_smoke  # the same path on CPU, with the
#                                            # smallest model (tests)
#   bash tools/bench/gpu_benchmark.sh --help       # this text (exit status 0)
# Environment: PYTHON (default python3), OUT (results folder),
#   GPU_BENCH_BUDGET_S (default 480: the whole run's limit),
#   GPU_BENCH_EXTRAS (default 1; 0 leaves out the A/B and torch variants),
#   GPU_BENCH_PEAK_TFLOPS (default 790).
set -u
if [[ "${1:-}" == "--help" || "${1:-}" == "-h" ]]; then
  # The header above is the usage.
  sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"
  exit 0
fi
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-python3}"
MODE=gpu
if [[ "${1:-}" == "--cpu_smoke" ]]; then MODE=cpu_smoke; fi
RESULTS="${OUT:-$(mktemp -d /tmp/gpu_benchmark.XXXXXX)}"
mkdir -p "$RESULTS"
WORKDIR="$(mktemp -d /tmp/gpu_benchmark_work.XXXXXX)"
START=$(date +%s)
BUDGET="${GPU_BENCH_BUDGET_S:-480}"
EXTRAS="${GPU_BENCH_EXTRAS:-1}"
PEAK="${GPU_BENCH_PEAK_TFLOPS:-790}"
log() { echo "[gpu_benchmark +$(( $(date +%s) - START ))s] $*" >&2; }

export KERAS_BACKEND=jax
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # Several processes share a GPU.
export PYTHONUNBUFFERED=1
export TF_CPP_MIN_LOG_LEVEL=2

# 1. What the machine lacks: Keras and its small dependencies, gin-config.
if ! "$PYTHON" -c "import keras, gin, optree, namex" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    log "installing $(ls .whl | tr '\n' ' ')into /tmp/site"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile \
      --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || {
      log "wheel install failed"; exit 2; }
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  else
    log "keras/gin missing and no .whl/ folder carried"; exit 2
  fi
fi

# 2. The environment, as one JSON line.
"$PYTHON" - "$MODE" <<'EOF' | tee "$RESULTS/environment.json"
import json, platform, subprocess, sys
info = {"run": "gpu_benchmark environment", "mode": sys.argv[1],
        "python": platform.python_version()}
for name in ("jax", "jaxlib", "keras", "numpy", "torch", "torchvision"):
  try:
    info[name] = __import__(name).__version__
  except Exception as e:  # pylint: disable=broad-except
    info[name] = f"unavailable ({type(e).__name__})"
try:
  import jax
  info["jax_devices"] = [str(d) for d in jax.devices()]
except Exception as e:  # pylint: disable=broad-except
  info["jax_devices"] = f"error: {e}"
try:
  info["nvidia_smi"] = subprocess.run(
      ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,"
       "clocks.sm,temperature.gpu", "--format=csv,noheader"],
      capture_output=True, text=True, timeout=20).stdout.strip()
except Exception as e:  # pylint: disable=broad-except
  info["nvidia_smi"] = f"unavailable ({type(e).__name__})"
print(json.dumps(info), flush=True)
EOF

# 3. The measurements.
PEER=()
if "$PYTHON" -c "import torch, torchvision" 2>/dev/null; then
  PEER=(--peer)
else
  log "torch/torchvision not importable: torchvision peer skipped"
fi
if [[ "$MODE" == cpu_smoke ]]; then
  export JAX_PLATFORMS=cpu
  ARGS=(--config=micro --precision=float32 --batch_sizes=1,2
        --infer_batch_sizes=1 --torch_batch_sizes=1 --steps=2 --warmup=1
        --infer_steps=2)
  EXTRA_ARGS=(--variant=bn_float32_io+bn_matmul_sums@1
              --torch_variants=eager,channels_last+compile@1)
  TIMEOUT=900  # Four XLA compiles at once on a small, maybe busy CPU.
else
  ARGS=(--config=r101_1024 --precision=mixed_bfloat16 --batch_sizes=8,16,32
        --infer_batch_sizes=1,8 --torch_batch_sizes=8,16 --steps=10
        --warmup=3 --infer_steps=20)
  EXTRA_ARGS=(--variant=bn_float32_io+bn_matmul_sums@16
              --variant=bn_float32_io@16
              --variant=keras_batch_norm@16
              --variant=infer:nms_early_exit+unfolded_inference_norms@1
              --variant=infer:nms_early_exit@1
              --variant=infer:pre_nms_num_boxes=1000@1
              --torch_variants=eager,channels_last@8,channels_last+compile@8)
  TIMEOUT=$(( BUDGET - $(date +%s) + START - 20 ))
fi
if [[ "$EXTRAS" == 0 ]]; then EXTRA_ARGS=(); fi
log "running tools/bench/benchmark.py (all measurements within ${TIMEOUT}s)"
timeout --kill-after=10 "$(( TIMEOUT + 15 ))" \
  "$PYTHON" -m tools.bench.benchmark --backend=jax --synthetic "${ARGS[@]}" \
  "${EXTRA_ARGS[@]}" "${PEER[@]}" --peak_tflops="$PEAK" --parallel \
  --timeout="$TIMEOUT" \
  --barrier_timeout="$(( TIMEOUT - 90 ))" --workdir="$WORKDIR" \
  --output="$RESULTS/gpu_benchmark.jsonl" 2>"$RESULTS/benchmark_stderr.log"
STATUS=$?
log "benchmark.py exit status $STATUS"

# 3b. The input pipeline, apart from the step (host CPUs; needs TensorFlow).
INPUT_ARGS=(--output_sizes=1024 --num_images=200 --warmup=10)
if [[ "$MODE" == cpu_smoke ]]; then
  INPUT_ARGS=(--output_sizes=128 --num_images=8 --warmup=2 --modes=all_cores)
fi
if "$PYTHON" -c "import tensorflow" 2>/dev/null; then
  log "input pipeline: tools/bench/benchmark_input.py ${INPUT_ARGS[*]}"
  INPUT_TIMEOUT=$(( BUDGET - $(date +%s) + START - 10 ))
  if [[ "$MODE" == cpu_smoke ]]; then INPUT_TIMEOUT=300; fi
  if (( INPUT_TIMEOUT > 30 )); then
    timeout --kill-after=10 "$INPUT_TIMEOUT" "$PYTHON" -m tools.bench.benchmark_input \
      "${INPUT_ARGS[@]}" >"$RESULTS/input_pipeline.jsonl" \
      2>"$RESULTS/input_stderr.log" || log "input pipeline measurement failed"
  else
    log "no time left for the input pipeline measurement"
  fi
else
  log "TensorFlow not importable: input pipeline not measured here (run" \
      "tools/bench/benchmark_input.py on the training host)"
fi
tar -czf "$RESULTS/worker_logs.tar.gz" -C "$WORKDIR" --exclude="*.npy" --exclude="*.tfrecord" . 2>/dev/null || true
rm -rf "$WORKDIR"

# 4. A short table (the last lines of the output), the input pipeline first.
"$PYTHON" - "$RESULTS/gpu_benchmark.jsonl" "$RESULTS/input_pipeline.jsonl" <<'EOF'
import json, sys
def read(path):
  try:
    return [json.loads(l) for l in open(path) if l.strip().startswith("{")]
  except OSError:
    return []
for r in read(sys.argv[2]):
  print(f"input pipeline {r['measure']} {r['output_size']} px: "
        f"{r['images_per_s']} images/s ({r['machine_cores']} cores)")
rows = read(sys.argv[1])
def label(r):
  extra = list(r.get("levers") or [])
  if r.get("torch_variant") not in (None, "eager"):
    extra = [r["torch_variant"]]
  return r.get("impl", "") + (f"[{'+'.join(extra)}]" if extra else "")
def cell(value, fmt):
  return "" if value is None else format(value, fmt)
peaks = sorted({r["peak_tflops"] for r in rows if r.get("peak_tflops")})
print(f"MFU against {', '.join(str(p) for p in peaks) or '?'} TFLOP/s; "
      "TFLOP/step from XLA's cost analysis of the compiled step (torchvision:"
      " torch.utils.flop_counter)")
print(f"{'impl':<44} {'measure':<7} {'batch':>5} {'images/s':>9} "
      f"{'ms/image':>9} {'TFLOP/st':>8} {'TFLOP/s':>8} {'MFU':>6} "
      f"{'compile_s':>9} {'dev_GiB':>8}  status")
for r in rows:
  if r.get("summary"):
    continue
  status = "ok" if r.get("ok") else "FAILED " + str(r.get("error", ""))[:80]
  print(f"{label(r):<44} {r.get('measure', ''):<7} "
        f"{r.get('batch_size', ''):>5} {cell(r.get('images_per_s'), ''):>9} "
        f"{cell(r.get('ms_per_image'), ''):>9} "
        f"{cell(r.get('tflop_per_step'), '.3f'):>8} "
        f"{cell(r.get('tflops_per_s'), '.1f'):>8} "
        f"{cell(r.get('mfu'), '.3f'):>6} {cell(r.get('compile_s'), ''):>9} "
        f"{str(r.get('device_peak_gib', '')):>8}  {status}")
EOF
log "done; results in $RESULTS"
exit "$STATUS"
