r"""XLA cost analysis of the product's JAX steps, on any machine (CPU too).

Builds the model of a configuration, lowers `jax_step.TrainStep` (the step
of `KERAS_BACKEND=jax python train.py`) and/or `jax_step.PredictStep` on
abstract inputs of the given batch (nothing is run), compiles them for the
local backend, and prints one JSON object per step:

- `lowered`: the program before XLA's optimisations, the same on every
  backend: `flops` (XLA's cost analysis), `bytes_accessed` (every op's
  operands and result, unfused: an upper bound on memory traffic), the
  census of convolutions and dots by operand/result dtype with their FLOPs
  (from the shapes), the bytes every op writes by dtype, and both per model
  part (`regions`, forward and backward apart).
- `compiled` (unless `--no_compile`): the executable for this machine's
  backend: `flops` and `bytes_accessed` after fusion, `memory` from
  `compiled.memory_analysis()` (arguments, outputs, aliased (donated)
  buffers, temporaries; `peak_estimate` = arguments + outputs - aliased +
  temporaries), and the same census on the optimised module. Note: XLA's
  CPU backend computes bfloat16 convolutions, dots and elementwise ops in
  float32 (it inserts converts), so on the CPU the compiled census and
  bytes show float32 where a GPU runs bfloat16; the lowered census shows
  the program's dtypes.
- `flops_per_image`: lowered FLOPs / batch.
- `saved_for_backward` (train): the bytes by dtype of what the program
  keeps from the forward pass for the backward pass (see
  `saved_for_backward`).

FLOPs and bytes are XLA's own cost model: 2 FLOPs per multiply-add; a
`while` loop's body (the NMS) may be counted once rather than per trip (it
does no matrix work, so the FLOPs hardly change). The census computes conv
FLOPs from the shapes over full windows (padding included), a few percent
above XLA's count.

`mfu_fields` (used by the GPU benchmark) turns a step's FLOPs and measured
time into TFLOP/s and MFU against a stated peak.

Examples (CPU; R101 at 1024 compiles for several minutes):
  KERAS_BACKEND=jax python -m tools.bench.cost_analysis --config=r50_1024 \
      --precision=mixed_bfloat16 --batch_size=2 --step=train
  KERAS_BACKEND=jax python -m tools.bench.cost_analysis --config=r101_1024 \
      --precision=mixed_bfloat16 --batch_size=1 --step=predict --no_compile
  ... --batch_norm=keras   # Keras' own batch norm instead of ours (A/B)
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

from tools.bench import common
from tools.bench import hlo_census

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))

# The H200's sustained bf16 dense matrix-product rate measured for issue 20
# (../shared/perf/README.md; 989 TFLOP/s is the datasheet's dense peak).
DEFAULT_PEAK_TFLOPS = 790.0


def _first(analysis):
  """`cost_analysis()` gives a dict (newer JAX) or a list of one dict."""
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  return analysis or {}


def cost_numbers(analysis):
  """(flops, bytes accessed) of a `cost_analysis()` result (None if absent)."""
  analysis = _first(analysis)
  flops = analysis.get("flops")
  nbytes = analysis.get("bytes accessed")
  return (float(flops) if flops is not None else None,
          float(nbytes) if nbytes is not None else None)


def memory_numbers(compiled):
  """`compiled.memory_analysis()` as a dict of bytes (empty if absent)."""
  try:
    stats = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    stats = None
  if stats is None:
    return {}
  out = {}
  for key in ("argument_size_in_bytes", "output_size_in_bytes",
              "alias_size_in_bytes", "temp_size_in_bytes",
              "generated_code_size_in_bytes", "peak_memory_in_bytes"):
    value = getattr(stats, key, None)
    if value is not None:
      out[key.replace("_size_in_bytes", "").replace("_in_bytes", "")] = int(
          value)
  if {"argument", "output", "alias", "temp"} <= set(out):
    out["peak_estimate"] = (out["argument"] + out["output"] - out["alias"] +
                            out["temp"])
  return out


def step_flops(lowered, compiled=None):
  """The FLOPs of a step for MFU: the compiled module's when XLA reports
  them, else the lowered module's. Returns `{step_flops, flops_source,
  lowered_flops, compiled_flops}`."""
  out = {"lowered_flops": None, "compiled_flops": None}
  try:
    out["lowered_flops"] = cost_numbers(lowered.cost_analysis())[0]
  except Exception:  # pylint: disable=broad-except
    pass
  if compiled is not None:
    try:
      out["compiled_flops"] = cost_numbers(compiled.cost_analysis())[0]
    except Exception:  # pylint: disable=broad-except
      pass
  if out["compiled_flops"]:
    out["step_flops"], out["flops_source"] = out["compiled_flops"], "compiled"
  elif out["lowered_flops"]:
    out["step_flops"], out["flops_source"] = out["lowered_flops"], "lowered"
  else:
    out["step_flops"], out["flops_source"] = None, None
  return out


def mfu_fields(flops, seconds, peak_tflops, batch_size=None):
  """TFLOP/s and model-FLOPs utilisation of a step that took `seconds`."""
  if not flops or not seconds:
    return {"tflop_per_step": None, "tflops_per_s": None, "mfu": None,
            "peak_tflops": peak_tflops}
  rate = flops / seconds / 1e12
  out = {"tflop_per_step": _significant(flops / 1e12),
         "tflops_per_s": _significant(rate),
         "mfu": _significant(rate / peak_tflops) if peak_tflops else None,
         "peak_tflops": peak_tflops}
  if batch_size:
    out["tflop_per_image"] = _significant(flops / 1e12 / batch_size)
  return out


def _significant(value, digits=4):
  """`value` rounded to `digits` significant digits (tiny CPU rates too)."""
  return float(f"{value:.{digits}g}")


# ------------------------------------------------------------------ levers
# Each lever changes the product code in this process only, for A/B
# comparisons (this tool's `--lever`, tools/bench/benchmark.py's `--lever` and
# `--variant`). `bn_float32_io` + `bn_matmul_sums` together are the batch
# norm as it was before issue 20 (input cast to float32, channel sums as
# matmuls under every backend).
def bn_float32_io():
  """Batch norm on a float32 copy of its input (the former dtype handling:
  float32 [N, C] tensors kept for the backward pass)."""
  from keras import ops
  from official_shapemask.modeling.layers import batch_norm
  inner = batch_norm.batch_norm_train

  def float32_io(x, gamma, beta, epsilon, **options):
    y, mean, variance = inner(ops.cast(x, "float32"), gamma, beta, epsilon,
                              **options)
    return ops.cast(y, x.dtype), mean, variance

  batch_norm.batch_norm_train = float32_io


def bn_matmul_sums():
  """Batch-norm channel sums as `ones @ t` matmuls under JAX too."""
  from official_shapemask.modeling.layers import batch_norm
  inner = batch_norm.batch_norm_train

  def matmul_sums(x, gamma, beta, epsilon, **options):
    options["channel_sum"] = "matmul"
    return inner(x, gamma, beta, epsilon, **options)

  batch_norm.batch_norm_train = matmul_sums


def use_keras_batch_norm():
  """A/B lever: our `BatchNormalization` runs Keras' own training path."""
  from official_shapemask.modeling.layers import batch_norm
  batch_norm.BatchNormalization.uses_fast_path = (
      lambda self, ndim, training, mask: False)


def unfold_inference_norms():
  """A/B lever: inference batch norms not folded into the convolutions."""
  from official_shapemask.modeling.layers import conv_norm
  conv_norm.uses_moving_statistics = (
      lambda norm, training: False)
  original = conv_norm.conv_norm

  def unfolded(conv, norm, inputs, training=None):
    if norm is None:
      return conv(inputs)
    return norm(conv(inputs), training=training)

  conv_norm.conv_norm = unfolded
  # The modules imported the function by name.
  from official_shapemask.modeling.backbones import resnet
  from official_shapemask.modeling.heads import coarse_mask_head
  from official_shapemask.modeling.heads import fine_mask_head
  from official_shapemask.modeling.heads import retinanet_head
  for module in (resnet, coarse_mask_head, fine_mask_head, retinanet_head):
    if getattr(module, "conv_norm", None) is original:
      module.conv_norm = unfolded


def nms_early_exit():
  """NMS as a while loop that stops when no candidate is left (the form
  before issue 20; TensorFlow's), under JAX too."""
  from official_shapemask.ops import nms
  nms.default_fixed_steps = lambda: False


LEVERS = {
    "bn_float32_io": bn_float32_io,
    "bn_matmul_sums": bn_matmul_sums,
    "keras_batch_norm": use_keras_batch_norm,
    "nms_early_exit": nms_early_exit,
    "unfolded_inference_norms": unfold_inference_norms,
}


# ---------------------------------------------------------------- analysis
def _abstract(tree, sharding):
  """numpy arrays -> `jax.ShapeDtypeStruct`s with `sharding`."""
  import jax
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
      tree)


def build_model(kwargs, precision, num_clusters=8):
  """The benchmark's model: `kwargs`, random priors, `precision` policy."""
  import keras
  from official_shapemask.modeling import factory
  keras.mixed_precision.set_global_policy(precision)
  model = factory.build_shapemask_model(num_clusters=num_clusters, **kwargs)
  model.prior_head.set_shape_priors(common.random_priors(
      kwargs["num_classes"] if kwargs["use_category_for_mask"] else 1,
      num_clusters, kwargs["mask_crop_size"]))
  return model


def lower_train(model, kwargs, batch_size, distribution):
  """`TrainStep.lower` on abstract state and batch, and what it saves for
  the backward pass: `(lowered, {"saved_for_backward": ...})`."""
  import jax
  import keras
  from official_shapemask.training import jax_step
  optimizer = keras.optimizers.SGD(learning_rate=1e-3, momentum=0.9)
  train_step = jax_step.TrainStep(model, optimizer, distribution=distribution)
  state = jax.tree_util.tree_map(
      lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                     sharding=train_step.state_sharding),
      tuple([v.value for v in group] for group in train_step.variables()))
  batch = _abstract(common.synthetic_batch(kwargs, batch_size),
                    jax_step.batch_sharding(distribution))
  return train_step.lower(state, *batch), {
      "saved_for_backward": saved_for_backward(train_step, state, batch)}


def saved_for_backward(train_step, state, batch):
  """What the training step's program keeps from its forward pass for the
  backward pass (JAX's residuals of `jax.vjp` of the loss, traced on
  abstract values: nothing runs), in bytes by dtype.

  This is the program's own choice, before XLA: a compiler may still
  recompute a cheap residual instead of storing it, but not one that comes
  out of a convolution, a matmul or a reduction.
  """
  import collections
  import jax
  import numpy as np
  trainable, non_trainable, _ = state
  images, labels = batch

  def residuals(trainable, non_trainable, images, labels):
    _, pullback, _ = jax.vjp(
        lambda t: train_step._loss(t, non_trainable, images, labels),
        trainable, has_aux=True)
    return jax.tree_util.tree_leaves(pullback)

  shapes = jax.eval_shape(residuals, trainable, non_trainable, images, labels)
  by_dtype = collections.Counter()
  large_f32 = []
  for leaf in shapes:
    nbytes = int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
    by_dtype[str(np.dtype(leaf.dtype))] += nbytes
    if np.dtype(leaf.dtype) == np.float32 and nbytes >= 2**20:
      large_f32.append(nbytes)
  return {"bytes_by_dtype": dict(by_dtype.most_common()),
          "total_bytes": int(sum(by_dtype.values())),
          "float32_tensors_of_1mib_or_more": len(large_f32),
          "float32_bytes_in_those": int(sum(large_f32))}


def lower_predict(model, kwargs, batch_size, distribution):
  """`PredictStep.lower` on abstract weights, images and image_info:
  `(lowered, {})`."""
  import jax
  from official_shapemask.training import jax_step
  predict = jax_step.PredictStep(model, distribution)
  replicated = jax_step.replicated_sharding(distribution)
  state = jax.tree_util.tree_map(
      lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=replicated),
      ([v.value for v in model.trainable_variables],
       [v.value for v in model.non_trainable_variables]))
  size = int(kwargs["image_size"])
  sharding = jax_step.batch_sharding(distribution)
  images = jax.ShapeDtypeStruct((batch_size, size, size, 3), "float32",
                                sharding=sharding)
  info = jax.ShapeDtypeStruct((batch_size, 4, 2), "float32",
                              sharding=sharding)
  return predict.lower(state, images, info), {}


def _dump(dump_prefix, suffix, text):
  if dump_prefix:
    tmp = f"{dump_prefix}.{suffix}.hlo.tmp"
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, f"{dump_prefix}.{suffix}.hlo")


def analyze_lowered(lowered, batch_size, compile_step=True, dump_prefix=None):
  """The JSON-ready analysis of one lowered step (see the module doc).

  `dump_prefix`: also write the HLO texts to `<prefix>.lowered.hlo` and
  `<prefix>.compiled.hlo`.
  """
  flops, nbytes = cost_numbers(lowered.cost_analysis())
  try:
    text = lowered.as_text(dialect="hlo", debug_info=True)
  except TypeError:  # Older JAX: no debug_info.
    text = lowered.as_text(dialect="hlo")
  _dump(dump_prefix, "lowered", text)
  out = {"lowered": dict(flops=flops, bytes_accessed=nbytes,
                         **hlo_census.analyze(text))}
  out["flops_per_image"] = flops / batch_size if flops else None
  if compile_step:
    t = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t
    flops_c, nbytes_c = cost_numbers(compiled.cost_analysis())
    _dump(dump_prefix, "compiled", compiled.as_text())
    out["compiled"] = dict(
        backend=_backend(), compile_s=round(compile_s, 1), flops=flops_c,
        bytes_accessed=nbytes_c, memory=memory_numbers(compiled),
        **hlo_census.analyze(compiled.as_text()))
  return out


def _backend():
  import jax
  return jax.default_backend()


def _commit():
  try:
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True, cwd=_REPO_ROOT,
                         timeout=10, check=False).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--",
                            "official_shapemask", "tools"],
                           capture_output=True, text=True, cwd=_REPO_ROOT,
                           timeout=10, check=False).stdout.strip()
    return sha + ("+changes" if dirty else "") if sha else None
  except (OSError, subprocess.SubprocessError):
    return None


def run(config=None, gin_files=(), gin_bindings=(), overrides=None,
        precision="mixed_bfloat16", batch_size=1, steps=("train",),
        compile_step=True, levers=(), num_clusters=8, print_fn=None,
        dump_hlo=None):
  """Analyses the given steps; returns a list of JSON-ready dicts."""
  os.environ.setdefault("KERAS_BACKEND", "jax")
  import keras
  if keras.backend.backend() != "jax":
    raise RuntimeError("cost_analysis needs KERAS_BACKEND=jax (got "
                       f"{keras.backend.backend()})")
  from official_shapemask.training import jax_step
  for lever in levers:
    LEVERS[lever]()
  kwargs = common.model_kwargs(config, gin_files, gin_bindings, overrides)
  kwargs.pop("num_clusters", None)
  t = time.perf_counter()
  model = build_model(kwargs, precision, num_clusters)
  build_s = time.perf_counter() - t
  import jax
  distribution = jax_step.data_parallel(jax.devices()[:1])
  keras.distribution.set_distribution(distribution)
  results = []
  for step in steps:
    t = time.perf_counter()
    lower = lower_train if step == "train" else lower_predict
    lowered, extras = lower(model, kwargs, batch_size, distribution)
    lower_s = time.perf_counter() - t
    record = {
        "tool": "cost_analysis", "step": step,
        "step_class": ("official_shapemask.training.jax_step." +
                       ("TrainStep" if step == "train" else "PredictStep")),
        "config": config or "+".join(gin_files) or "default",
        "bindings": list(gin_bindings), "levers": list(levers),
        "backbone_depth": kwargs["backbone_depth"],
        "image_size": kwargs["image_size"], "precision": precision,
        "batch_size": batch_size, "date": common.now(), "commit": _commit(),
        "jax": jax.__version__, "keras": keras.__version__,
        "machine": f"{os.cpu_count()} cores, {platform.machine()}",
        "build_s": round(build_s, 1), "lower_s": round(lower_s, 1)}
    record.update(extras)
    prefix = None
    if dump_hlo:
      os.makedirs(dump_hlo, exist_ok=True)
      prefix = os.path.join(dump_hlo, f"{step}_b{batch_size}")
    record.update(analyze_lowered(lowered, batch_size, compile_step, prefix))
    results.append(record)
    if print_fn:
      print_fn(record)
  return results


def summary_line(record):
  """One human line: the numbers a before/after table needs."""
  low = record["lowered"]
  parts = [f"{record['step']} b{record['batch_size']}",
           f"{low['flops'] / 1e12:.4f} TFLOP "
           f"({record['flops_per_image'] / 1e12:.4f}/image)",
           f"lowered bytes {low['bytes_accessed'] / 1e9:.2f} GB",
           "written " + ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in
                                  low["written_bytes_by_dtype"].items()
                                  if v >= 1e7)]
  saved = record.get("saved_for_backward")
  if saved:
    parts.append("saved for backward " + ", ".join(
        f"{k} {v / 1e9:.2f} GB" for k, v in saved["bytes_by_dtype"].items()
        if v >= 1e7))
  comp = record.get("compiled")
  if comp:
    mem = comp["memory"]
    parts.append(f"compiled ({comp['backend']}) bytes "
                 f"{comp['bytes_accessed'] / 1e9:.2f} GB")
    if "peak_estimate" in mem:
      parts.append(f"temp {mem['temp'] / 2**30:.2f} GiB, peak "
                   f"{mem['peak_estimate'] / 2**30:.2f} GiB")
  census = "; ".join(f"{kind} {key} x{v['count']} {v['gflop']:.1f} GFLOP "
                     f"reading {v['operand_bytes'] / 1e9:.2f} GB"
                     for kind, groups in low["census"].items()
                     for key, v in groups.items())
  return " | ".join(parts) + " | " + census


def parse_args(argv):
  p = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default=None, choices=sorted(common.CONFIGS))
  p.add_argument("--gin_file", action="append", default=[])
  p.add_argument("--gin_bindings", action="append", default=[])
  p.add_argument("--image_size", type=int, default=None)
  p.add_argument("--precision", default="mixed_bfloat16",
                 choices=("float32", "mixed_bfloat16"))
  p.add_argument("--batch_size", type=int, default=1)
  p.add_argument("--step", default="train",
                 help="comma-separated: train, predict")
  p.add_argument("--no_compile", action="store_true",
                 help="lowered module only (fast; no memory analysis)")
  p.add_argument("--lever", action="append", default=[],
                 choices=sorted(LEVERS),
                 help="A/B variants applied to the product code in this "
                 "process only")
  p.add_argument("--batch_norm", default="ours", choices=("ours", "keras"),
                 help="'keras': Keras' own BatchNormalization training path "
                 "(same as --lever=keras_batch_norm)")
  p.add_argument("--num_clusters", type=int, default=8)
  p.add_argument("--output", default=None,
                 help="also write the JSON records (one per line) here")
  p.add_argument("--dump_hlo", default=None,
                 help="folder for the HLO texts (<step>_b<batch>.lowered.hlo "
                 "and .compiled.hlo)")
  args = p.parse_args(argv)
  steps = [s.strip() for s in args.step.split(",") if s.strip()]
  bad = [s for s in steps if s not in ("train", "predict")]
  if bad or not steps:
    p.error(f"--step: train and/or predict, got {args.step!r}")
  args.steps = steps
  if args.batch_norm == "keras" and "keras_batch_norm" not in args.lever:
    args.lever.append("keras_batch_norm")
  if args.gin_file and args.config:
    p.error("give --config or --gin_file, not both")
  return args


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  os.environ["KERAS_BACKEND"] = "jax"
  overrides = {"image_size": args.image_size} if args.image_size else None
  config = args.config or (None if args.gin_file else "r50_256")
  records = []

  def emit(record):
    records.append(record)
    print(json.dumps(record), flush=True)
    print("# " + summary_line(record), file=sys.stderr, flush=True)

  run(config, args.gin_file, args.gin_bindings, overrides, args.precision,
      args.batch_size, args.steps, not args.no_compile, args.lever,
      args.num_clusters, print_fn=emit, dump_hlo=args.dump_hlo)
  if args.output:
    tmp = args.output + ".tmp"
    with open(tmp, "w") as f:
      for r in records:
        f.write(json.dumps(r) + "\n")
    os.replace(tmp, args.output)
  return 0


if __name__ == "__main__":
  sys.exit(main())
