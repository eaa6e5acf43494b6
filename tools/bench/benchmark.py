r"""Training and inference speed and peak memory of ShapeMask, with peers.

The command line of the `tools/bench` package: `bench.common` (configurations,
synthetic data, timing), `bench.tf_workers`, `bench.jax_workers`,
`bench.torch_workers` (one module per worker family) and `bench.runner`
(subprocesses and summaries).

Every measurement runs in a subprocess of its own (so each has its own peak
memory) and prints one JSON line; the last line of a run is one JSON summary
object. Measurements:

- ``train``: median seconds per training step after ``--warmup`` steps
  (``first_step_s``, which includes tracing / compilation, is reported
  apart), images/s = batch / median, and the process's peak RSS.
- ``infer``: median seconds per inference call at the inference batch, with
  post-processing (decode, per-class NMS, top-k) and the mask branch on the
  detections; ``ms_per_image``.

Backends:

``--backend=tensorflow`` (default). Our model runs our custom loop's replica
step (`official_shapemask.training.train_loop.TrainLoop`, one step per call,
under a `OneDeviceStrategy`) on batches made by our training parser; inference
is a `tf.function` of `model(inputs, training=False)`. ``--peer`` also
measures tf-models-official's legacy ShapeMask (`official/legacy/detection`,
Keras 2) built with the same depth, image size, batch, classes, heads and
priors shape, with the step of its `DetectionDistributedExecutor`, in the same
run, alternating ours and the port's, and prints ours/port ratios
(``train_ratio`` and ``infer_ratio`` are time ratios: < 1 means ours is
faster). Both parse the same synthetic tf.Examples (random JPEG images with
four box masks each, the generator of ../shared/tools/peer_legacy_shapemask.py)
with their own parser; the first ``--num_batches`` batches are cached in
memory and repeated, so parsing is not timed. Both use the same random shape
priors (``--num_clusters`` per class). For inference both models' class
predictors are redrawn the same way (``--infer_scores=realistic``, the
default: five classes score ~0.12 at every anchor, the other classes ~0.01,
as a trained model's scores on one image look: most classes have no
candidate above the 0.05 threshold, detections fill the 100 slots); the
port's post-processing time depends strongly on this (its padded NMS scans
all 5000 candidates of a class that has none above the threshold), ours
hardly. `num_detections` is reported.

``--backend=jax --synthetic``: no TensorFlow. Static synthetic batches built
with numpy in the training-batch layout of docs/contracts.md (class ids, -1
negatives, -2 ignored, num_positives, GT mask boxes and targets) are placed
on the devices once; the train step is the one `KERAS_BACKEND=jax python
train.py` runs, `official_shapemask.training.jax_step.TrainStep` (SGD
momentum 0.9, `keras.distribution.DataParallel` over the local devices), and
inference is the engine's `jax_step.PredictStep`. It reports images/s for
each of ``--batch_sizes`` (synthetic input: the step alone) and ms/image for
inference at ``--infer_batch_size``; the input pipeline's images/s is
measured apart (`tools/bench/benchmark_input.py`).
Every JAX result carries the step's FLOPs from XLA's cost analysis of the
compiled step (`step_flops`, and the lowered module's `lowered_flops`),
TFLOP/s from the median step time, and `mfu` against ``--peak_tflops``
(default 790, the H200's measured bf16 matrix-product rate; say which peak
when you quote an MFU). ``--infer_batch_sizes=1,8`` measures inference at
several batches. ``--variant=[train:|infer:]PART[+PART]@BATCH`` adds a
measurement of the product's step with A/B levers of
`tools/bench/cost_analysis.py` or `build_shapemask_model` settings changed
(e.g. ``bn_float32_io+bn_matmul_sums@16``: training with the batch norm
before issue 20; ``keras_batch_norm@16``: with Keras' own;
``infer:unfolded_inference_norms@1``, ``infer:pre_nms_num_boxes=1000@1``);
``--lever`` applies levers to every measurement. ``--skip_train`` / ``--skip_infer`` leave out the training /
inference measurements (with or without ``--parallel``).
``--peer`` adds torchvision's `maskrcnn_resnet50_fpn` (random weights,
synthetic targets, images kept at the canvas size, bf16 autocast when
``--precision=mixed_bfloat16``) training throughput, with the FLOPs of one
eager step (`torch.utils.flop_counter`) and its MFU;
``--torch_variants=eager,channels_last,channels_last+compile@8`` adds what a
PyTorch user would switch on (see `tools/bench/torch_workers.py`). With
``--parallel`` the eager torchvision measurements run first, one at a time
on an idle host; then all of ours and the compiled torchvision variants
compile at once (compilation is CPU work; the ``--variant`` measurements
and torch.compile at a lower CPU priority), wait for each other, and run
their timed steps one at a time under a file lock; the whole stays within
``--timeout``.

``--profile_dir=DIR`` (TensorFlow): two more steps of every measurement run
under the TF profiler (traces in DIR for TensorBoard); each JSON line then
has `profile.busy_percent_by_op_type`.

``--workers=N`` (TensorFlow): N MultiWorkerMirroredStrategy processes on
127.0.0.1 against one process, with the same per-replica batch and
``--threads`` intra/inter-op threads per process (default: cores / N);
reports images/s of each and the scaling efficiency
`throughput_N / (N * throughput_1)`.

Built-in configurations (``--config``): ``r50_256`` (default), ``r50_640``,
``r101_1024``, ``r50_1024`` (reference heads, 91 classes, batch 2 / 2 / 8 /
8), ``tiny``
(ResNet-10, 128 px, narrow heads; the port can build it) and ``micro``
(quarter-width ResNet-10 at 64 px, levels 3-5; tests of the JAX path). ``--gin_file`` /
``--gin_bindings`` take `build_shapemask_model` settings from gin files
instead (shape priors: always ``--num_clusters`` random priors).

Examples:
  python -m tools.bench.benchmark --peer            # R50, 256 px, b2
  python -m tools.bench.benchmark --peer --config=r50_640
  python -m tools.bench.benchmark --peer --precision=mixed_bfloat16
  python -m tools.bench.benchmark --workers=2
  KERAS_BACKEND=jax python -m tools.bench.benchmark --backend=jax --synthetic \
      --config=r101_1024 --precision=mixed_bfloat16 --batch_sizes=8,16,32 \
      --peer --parallel
"""

import argparse
import json
import os
import platform
import sys
import tempfile

from tools.bench import common
from tools.bench import cost_analysis
from tools.bench import runner as runner_lib


def parse_args(argv):
  p = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--backend", default="tensorflow",
                 choices=("tensorflow", "jax"))
  p.add_argument("--synthetic", action="store_true",
                 help="numpy synthetic batches (required for --backend=jax)")
  p.add_argument("--config", default=None, choices=sorted(common.CONFIGS),
                 help="built-in configuration (default r50_256)")
  p.add_argument("--gin_file", action="append", default=[],
                 help="gin file(s) for build_shapemask_model settings")
  p.add_argument("--gin_bindings", action="append", default=[])
  p.add_argument("--image_size", type=int, default=None)
  p.add_argument("--batch_size", type=int, default=None)
  p.add_argument("--batch_sizes", default=None,
                 help="JAX: comma-separated training batch sizes")
  p.add_argument("--infer_batch_size", type=int, default=1,
                 help="JAX: inference batch")
  p.add_argument("--infer_batch_sizes", default=None,
                 help="JAX: comma-separated inference batches (instead of "
                 "--infer_batch_size)")
  p.add_argument("--peak_tflops", type=float,
                 default=cost_analysis.DEFAULT_PEAK_TFLOPS,
                 help="JAX: the device's peak for MFU, TFLOP/s (default: "
                 "the H200's measured bf16 matrix-product rate, ~790)")
  p.add_argument("--lever", action="append", default=[],
                 choices=sorted(cost_analysis.LEVERS),
                 help="JAX: A/B variant of the product code applied in "
                 "every measurement (tools/bench/cost_analysis.py LEVERS)")
  p.add_argument("--variant", action="append", default=[],
                 help="JAX: an extra measurement [train:|infer:]PART[+PART]"
                 "@BATCH, a PART being a lever or a build_shapemask_model "
                 "setting name=value, e.g. bn_float32_io+bn_matmul_sums@16 "
                 "(training with the batch norm before issue 20) or "
                 "infer:pre_nms_num_boxes=1000@1")
  p.add_argument("--torch_variants", default="eager",
                 help="JAX --peer: comma-separated torchvision variants: "
                 "eager, channels_last, compile (torch.compile of the "
                 "ResNet-FPN backbone), compile_all (of the whole model), "
                 "and combinations such as channels_last+compile; "
                 "VARIANT@B measures that variant at batch B only (else at "
                 "--torch_batch_sizes)")
  p.add_argument("--torch_batch_sizes", default=None,
                 help="JAX --peer: torchvision batch sizes (default: "
                 "--batch_sizes)")
  p.add_argument("--precision", default="float32",
                 choices=("float32", "mixed_bfloat16"),
                 help="ours (the TF port always runs float32)")
  p.add_argument("--peer", action="store_true",
                 help="also measure the peer: TF -> tf-models-official's "
                 "legacy ShapeMask; JAX -> torchvision maskrcnn_resnet50_fpn")
  p.add_argument("--workers", type=int, default=0,
                 help="TF: N MultiWorkerMirrored processes vs one process")
  p.add_argument("--threads", type=int, default=0,
                 help="TF intra/inter-op threads per process (0 = TF's "
                 "default; --workers: cores / N)")
  p.add_argument("--steps", type=int, default=5, help="timed train steps")
  p.add_argument("--warmup", type=int, default=2,
                 help="untimed steps after the first")
  p.add_argument("--infer_steps", type=int, default=3)
  p.add_argument("--rounds", type=int, default=1,
                 help="TF: repeat the alternating ours/peer sequence")
  p.add_argument("--num_batches", type=int, default=2,
                 help="TF: distinct cached batches")
  p.add_argument("--num_clusters", type=int, default=8,
                 help="random shape priors per class")
  p.add_argument("--clip", type=float, default=None,
                 help="ours: global-norm clip (default 1.0 with --peer, as "
                 "the port hard-codes; else 0)")
  p.add_argument("--nesterov", type=int, default=None,
                 help="ours: Nesterov momentum (default 1 with --peer, as "
                 "the port's config; else 0)")
  p.add_argument("--freeze_early_norms", type=int, default=None,
                 help="ours: freeze gamma/beta of the stem and conv2_x batch "
                 "norms (default 1 with --peer, as the port's frozen-variable "
                 "regex does; else 0, the reference)")
  p.add_argument("--infer_scores", default="realistic",
                 choices=("realistic", "full", "init"),
                 help="inference load: 'realistic' = 5 classes with scores "
                 "above the threshold, the others below; 'full' = every "
                 "candidate above; 'init' = the initial predictor (none)")
  p.add_argument("--profile_dir", default=None,
                 help="TensorFlow: after timing, profile two more steps of "
                 "each measurement with the TF profiler into this folder and "
                 "report the busy time per op type")
  p.add_argument("--skip_train", action="store_true")
  p.add_argument("--skip_infer", action="store_true")
  p.add_argument("--parallel", action="store_true",
                 help="JAX: compile all measurements at once, time them one "
                 "at a time")
  p.add_argument("--barrier_timeout", type=int, default=0,
                 help="--parallel: longest wait for the others to compile "
                 "before timing anyway (default: --timeout)")
  p.add_argument("--timeout", type=int, default=1800,
                 help="seconds per measurement subprocess")
  p.add_argument("--output", default=None,
                 help="also write the JSON lines to this file")
  p.add_argument("--workdir", default=None,
                 help="where logs and synthetic data go (default: a "
                 "temporary directory)")
  p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args._worker is None:  # pylint: disable=protected-access
    if args.backend == "jax" and not args.synthetic:
      p.error("--backend=jax needs --synthetic (no TensorFlow input "
              "pipeline under JAX)")
    if args.workers and args.backend != "tensorflow":
      p.error("--workers needs --backend=tensorflow")
    if args.gin_file and args.config:
      p.error("give --config or --gin_file, not both")
    if (args.lever or args.variant) and args.backend != "jax":
      p.error("--lever and --variant need --backend=jax")
    # The settings' check imports the model code: with the run's backend
    # (the accelerator machine has no TensorFlow).
    os.environ["KERAS_BACKEND"] = args.backend
    try:
      runner_lib.parse_variants(args.variant)
    except ValueError as e:
      p.error(str(e))
    for item in args.torch_variants.split(","):
      variant, _, batch = item.strip().partition("@")
      if item.strip() and (not common.torch_variant_ok(variant) or
                           (batch and not batch.isdigit())):
        p.error(f"--torch_variants: bad item {item.strip()!r} (VARIANT or "
                f"VARIANT@BATCH; parts: "
                f"{', '.join(common.TORCH_VARIANT_PARTS)})")
  return args


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  if args._worker is not None:  # pylint: disable=protected-access
    spec = json.loads(args._worker)  # pylint: disable=protected-access
    return runner_lib.run_worker(spec)
  os.environ["KERAS_BACKEND"] = args.backend
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  config = args.config or (None if args.gin_file else "r50_256")
  overrides = {}
  if args.image_size:
    overrides["image_size"] = args.image_size
  kwargs = common.model_kwargs(config, args.gin_file, args.gin_bindings, overrides)
  kwargs.pop("num_clusters", None)
  default_batch = common.CONFIGS[config]["batch_size"] if config else 2
  args.batch_size = args.batch_size or default_batch
  args.batch_sizes = [int(b) for b in (args.batch_sizes or str(
      args.batch_size)).split(",")]
  if args.torch_batch_sizes:
    args.torch_batch_sizes = [int(b) for b in args.torch_batch_sizes.split(
        ",")]
  args.torch_variants = [v.strip() for v in args.torch_variants.split(",")
                         if v.strip()]
  if args.clip is None:
    args.clip = 1.0 if args.peer and args.backend == "tensorflow" else 0.0
  if args.nesterov is None:
    args.nesterov = bool(args.peer and args.backend == "tensorflow")
  args.nesterov = bool(args.nesterov)
  if args.freeze_early_norms is None:
    args.freeze_early_norms = bool(args.peer and args.backend == "tensorflow")
  args.freeze_early_norms = bool(args.freeze_early_norms)
  kwargs["freeze_early_norms"] = args.freeze_early_norms
  config_name = config or "+".join(os.path.basename(f) for f in args.gin_file)
  workdir = args.workdir or tempfile.mkdtemp(prefix="shapemask_bench_")
  os.makedirs(workdir, exist_ok=True)
  runner = runner_lib.Runner(args, workdir)
  print(json.dumps({
      "run": "benchmark", "date": common.now(), "command": " ".join(
          ["python", "-m", "tools.bench.benchmark"] +
          (argv if argv is not None else sys.argv[1:])),
      "machine": f"{os.cpu_count()} cores, {platform.machine()}, "
                 f"{platform.processor() or platform.platform()}",
      "load_avg": [round(x, 2) for x in os.getloadavg()],
      "model": kwargs, "workdir": workdir}), flush=True)
  prior_path = common.write_priors(os.path.join(workdir, "priors.npy"),
                            kwargs["num_classes"], args.num_clusters,
                            kwargs["mask_crop_size"])
  if args.backend == "jax":
    base = runner_lib.base_spec(args, kwargs, config_name, prior_path)
    summary = runner_lib.run_jax(args, runner, base)
  else:
    records = common.write_synthetic_records(
        os.path.join(workdir, "synthetic.tfrecord"),
        max(8, args.batch_size * args.num_batches), kwargs["num_classes"])
    base = runner_lib.base_spec(args, kwargs, config_name, prior_path, records)
    if args.workers:
      summary = runner_lib.run_workers(args, runner, base)
    else:
      summary = runner_lib.run_tensorflow(args, runner, base)
  summary["ours_settings"] = {"clip": args.clip, "nesterov": args.nesterov,
                              "freeze_early_norms": args.freeze_early_norms}
  failed = [r for r in runner.records if not r.get("ok")]
  runner.emit(summary)  # The last line.
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
