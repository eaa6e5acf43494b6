r"""Training and inference speed and peak memory of ShapeMask, with peers.

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
on the device once; the train step is a hand-written `jax.jit` of
`model.stateless_call`-style forward + `compute_losses` in a
`keras.StatelessScope`, `jax.value_and_grad` and the Keras optimizer's
`stateless_apply` (SGD momentum 0.9). It reports images/s for each of
``--batch_sizes`` and ms/image for inference at ``--infer_batch_size``.
``--peer`` adds torchvision's `maskrcnn_resnet50_fpn` (random weights,
synthetic targets, images kept at the canvas size, bf16 autocast when
``--precision=mixed_bfloat16``) training throughput. With ``--parallel``
the torchvision measurements run first, one at a time on an idle host; then
all of ours compile at once (XLA compilation is CPU work), wait for each
other, and run their timed steps one at a time under a file lock; the whole
stays within ``--timeout``.

``--profile_dir=DIR`` (TensorFlow): two more steps of every measurement run
under the TF profiler (traces in DIR for TensorBoard); each JSON line then
has `profile.busy_percent_by_op_type`.

``--workers=N`` (TensorFlow): N MultiWorkerMirroredStrategy processes on
127.0.0.1 against one process, with the same per-replica batch and
``--threads`` intra/inter-op threads per process (default: cores / N);
reports images/s of each and the scaling efficiency
`throughput_N / (N * throughput_1)`.

Built-in configurations (``--config``): ``r50_256`` (default), ``r50_640``,
``r101_1024`` (reference heads, 91 classes, batch 2 / 2 / 8), ``tiny``
(ResNet-10, 128 px, narrow heads; the port can build it) and ``micro``
(quarter-width ResNet-10 at 64 px, levels 3-5; tests of the JAX path). ``--gin_file`` /
``--gin_bindings`` take `build_shapemask_model` settings from gin files
instead (shape priors: always ``--num_clusters`` random priors).

Examples:
  python tools/benchmark.py --peer                      # R50, 256 px, b2
  python tools/benchmark.py --peer --config=r50_640
  python tools/benchmark.py --peer --precision=mixed_bfloat16
  python tools/benchmark.py --workers=2
  KERAS_BACKEND=jax python tools/benchmark.py --backend=jax --synthetic \
      --config=r101_1024 --precision=mixed_bfloat16 --batch_sizes=8,16,32 \
      --peer --parallel
"""

import argparse
import contextlib
import datetime
import inspect
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
  sys.path.insert(0, _REPO_ROOT)
_GIN_DIR = os.path.join(_REPO_ROOT, "gin")

# `build_shapemask_model` settings of the built-in configurations (the rest
# take that function's defaults: reference heads, levels 3-7, 91 classes).
CONFIGS = {
    "r50_256": dict(model=dict(backbone_depth=50, image_size=256),
                    batch_size=2),
    "r50_640": dict(model=dict(backbone_depth=50, image_size=640),
                    batch_size=2),
    "r101_1024": dict(model=dict(backbone_depth=101, image_size=1024),
                      batch_size=8),
    # The smallest model (tests of the JAX / GPU script's CPU path).
    "micro": dict(model=dict(backbone_depth=10, backbone_width_multiplier=0.25,
                             image_size=64, max_level=5, fpn_num_filters=16,
                             head_num_convs=1, head_num_filters=16,
                             num_downsample_channels=8, mask_num_convs=1,
                             mask_num_filters=8, pre_nms_num_boxes=100,
                             max_num_detections=20),
                  batch_size=1),
    "tiny": dict(model=dict(backbone_depth=10, image_size=128,
                            fpn_num_filters=32, head_num_convs=2,
                            head_num_filters=32, num_downsample_channels=16,
                            mask_num_convs=2, mask_num_filters=16,
                            pre_nms_num_boxes=500),
                 batch_size=2),
}
# What cannot be made equal between ours and torchvision's Mask R-CNN.
TORCH_PEER_NOTES = (
    "torchvision maskrcnn_resnet50_fpn: R50 (ours R101), two-stage with RoI "
    "heads (1000 RPN proposals/image in training, 512 sampled RoIs), 8 "
    "instances per image with full-image masks, images given at the canvas "
    "size (min_size = max_size = S), trainable BatchNorm (no pretrained "
    "weights), eager PyTorch (no torch.compile), SGD momentum 0.9")
# Inference load (see `_redraw_class_predictor`).
PRESENT_CLASSES = 5
PRESENT_BIAS = -2.0
PRIOR_BIAS = -4.595


# ---------------------------------------------------------------- helpers
def _now():
  return datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")


def _peak_rss_gib():
  return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)


def _median(values):
  return float(statistics.median(values)) if values else None


# Process CPU seconds per wall second over the last `_timed_steps` call.
_CPU_CORES_BUSY = []


def _timed_steps(step, warmup, steps):
  """Runs `step()` warmup + steps times; returns the timed seconds.

  Also records in `_CPU_CORES_BUSY` the process's CPU time (user + system,
  all threads) over the timed steps divided by their wall time: the average
  number of busy cores (the machine's core count when nothing idles).
  """
  for _ in range(warmup):
    step()
  times = []
  cpu = time.process_time()
  for _ in range(steps):
    t = time.perf_counter()
    step()
    times.append(time.perf_counter() - t)
  if times:
    _CPU_CORES_BUSY.append(
        round((time.process_time() - cpu) / sum(times), 2))
  return times


def _profile(spec, step):
  """`--profile_dir`: two more steps under the TF profiler.

  Returns the busy time per op type (thread idle time left out) as
  percentages, the top 12, and the trace directory (TensorBoard's profile
  plugin opens it); None without `--profile_dir`.
  """
  if not spec.get("profile_dir"):
    return None
  import collections
  import glob
  import tensorflow as tf
  logdir = os.path.join(spec["profile_dir"],
                        f"{spec['kind']}-{spec.get('id', 0)}")
  tf.profiler.experimental.start(logdir)
  for _ in range(2):
    step()
  tf.profiler.experimental.stop()
  out = {"trace_dir": logdir}
  try:
    from tensorflow.python.profiler.internal import _pywrap_profiler_plugin  # pylint: disable=g-import-not-at-top
    xspaces = sorted(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"),
                               recursive=True))[-1:]
    data, _ = _pywrap_profiler_plugin.xspace_to_tools_data(
        xspaces, "framework_op_stats", {})
    table = json.loads(data)[0]
    cols = [c["id"] for c in table["cols"]]
    kind, self_time = cols.index("type"), cols.index("total_self_time")
    by_type = collections.Counter()
    for row in table["rows"]:
      values = [c["v"] if isinstance(c, dict) else c for c in row["c"]]
      if values[kind] != "IDLE":
        by_type[values[kind]] += values[self_time]
    busy = sum(by_type.values()) or 1.0
    out["busy_percent_by_op_type"] = {
        k: round(100.0 * v / busy, 1) for k, v in by_type.most_common(12)}
  except Exception as e:  # pylint: disable=broad-except
    out["error"] = f"{type(e).__name__}: {e}"[:300]
  return out


def model_kwargs(config=None, gin_files=(), gin_bindings=(), overrides=None):
  """Full `build_shapemask_model` kwargs (every parameter filled in)."""
  from official_shapemask.modeling import factory
  params = inspect.signature(factory.build_shapemask_model).parameters
  kwargs = {k: v.default for k, v in params.items()}
  if gin_files or gin_bindings:
    kwargs.update(_gin_model_kwargs(gin_files, gin_bindings, list(params)))
  elif config:
    kwargs.update(CONFIGS[config]["model"])
  kwargs.update(overrides or {})
  kwargs["aspect_ratios"] = list(kwargs["aspect_ratios"])
  kwargs.pop("shape_prior_path", None)
  return kwargs


def _gin_model_kwargs(gin_files, gin_bindings, names):
  """`build_shapemask_model` values bound by gin files/bindings (no TF)."""
  import gin
  from official_shapemask.modeling import factory  # registers it.
  del factory
  gin.add_config_file_search_path(_GIN_DIR)
  files = []
  for name in gin_files:
    candidates = [name, name + ".gin", os.path.join(_GIN_DIR, name),
                  os.path.join(_GIN_DIR, name + ".gin")]
    found = [c for c in candidates if os.path.isfile(c)]
    if not found:
      raise FileNotFoundError(f"gin file {name!r} not found (also looked in "
                              f"{_GIN_DIR})")
    files.append(found[0])
  # Other configurables (Experiment, schedules) are skipped: only the model
  # settings matter here, and parsing them would import TensorFlow.
  gin.parse_config_files_and_bindings(files, list(gin_bindings),
                                      skip_unknown=True,
                                      finalize_config=False)
  out = {}
  for name in names:
    try:
      value = gin.query_parameter(f"build_shapemask_model.{name}")
    except ValueError:
      continue
    for _ in range(32):  # Follow macro references.
      if not isinstance(value, gin.config.ConfigurableReference):
        break
      selector = value.scoped_selector
      if not selector.endswith("/gin.macro"):
        break
      value = gin.query_parameter("%" + selector[:-len("/gin.macro")])
    if not isinstance(value, gin.config.ConfigurableReference) and (
        value is not gin.REQUIRED):
      out[name] = value
  return out


def write_priors(path, num_classes, num_clusters, mask_crop_size, seed=0):
  """Random uniform shape priors `[C, K, m, m]` (both implementations)."""
  import numpy as np
  rng = np.random.default_rng(seed)
  priors = rng.uniform(0.0, 1.0, (num_classes, num_clusters, mask_crop_size,
                                  mask_crop_size)).astype(np.float32)
  with open(path, "wb") as f:
    np.save(f, priors)
  return path


def write_synthetic_records(path, num_examples, num_classes, seed=0):
  """Synthetic COCO-style tf.Examples (as the peer script makes them)."""
  import numpy as np
  import tensorflow as tf
  rng = np.random.default_rng(seed)

  def feature(kind, values):
    if kind == "bytes":
      return tf.train.Feature(bytes_list=tf.train.BytesList(value=values))
    if kind == "float":
      return tf.train.Feature(float_list=tf.train.FloatList(value=values))
    return tf.train.Feature(int64_list=tf.train.Int64List(value=values))

  tmp = path + ".tmp"
  with tf.io.TFRecordWriter(tmp) as writer:
    for i in range(num_examples):
      h, w, n = 300, 400, 4
      image = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)
      boxes, masks, classes, areas = [], [], [], []
      for _ in range(n):
        y0, x0 = rng.uniform(0, 0.6, 2)
        bh, bw = rng.uniform(0.15, 0.4, 2)
        y1, x1 = min(y0 + bh, 1.0), min(x0 + bw, 1.0)
        mask = np.zeros((h, w, 1), np.uint8)
        mask[int(y0 * h):int(y1 * h), int(x0 * w):int(x1 * w)] = 1
        boxes.append((y0, x0, y1, x1))
        masks.append(tf.io.encode_png(mask).numpy())
        classes.append(int(rng.integers(1, num_classes)))
        areas.append(float(mask.sum()))
      b = np.array(boxes, np.float32)
      example = tf.train.Example(features=tf.train.Features(feature={
          "image/encoded": feature("bytes",
                                   [tf.io.encode_jpeg(image).numpy()]),
          "image/source_id": feature("bytes", [str(i).encode()]),
          "image/height": feature("int", [h]),
          "image/width": feature("int", [w]),
          "image/object/bbox/ymin": feature("float", b[:, 0]),
          "image/object/bbox/xmin": feature("float", b[:, 1]),
          "image/object/bbox/ymax": feature("float", b[:, 2]),
          "image/object/bbox/xmax": feature("float", b[:, 3]),
          "image/object/class/label": feature("int", classes),
          "image/object/area": feature("float", areas),
          "image/object/is_crowd": feature("int", [0] * n),
          "image/object/mask": feature("bytes", masks),
      }))
      writer.write(example.SerializeToString())
  os.replace(tmp, path)
  return path


def synthetic_batch(kwargs, batch_size, seed=0):
  """A random but valid training batch `(images, labels)` (numpy only).

  Layout of docs/contracts.md: 64 positive anchors per image with random
  class ids and box targets, 1% ignored (-2), the rest negative (-1); 8 GT
  mask slots with random boxes, their 1.25x outer boxes, random classes and
  random binary coarse / fine targets.
  """
  import numpy as np
  from official_shapemask.ops import anchors
  rng = np.random.default_rng(seed)
  size = int(kwargs["image_size"])
  num_classes = int(kwargs["num_classes"])
  total = anchors.num_anchors((size, size), kwargs["min_level"],
                              kwargs["max_level"], kwargs["num_scales"],
                              tuple(kwargs["aspect_ratios"]))
  b, n = batch_size, int(kwargs["num_mask_slots"])
  m, u = int(kwargs["mask_crop_size"]), int(kwargs["upsample_factor"])
  cls = np.full((b, total), -1, np.int32)
  box = np.zeros((b, total, 4), np.float32)
  for i in range(b):
    picked = rng.choice(total, size=64 + total // 100, replace=False)
    pos, ignored = picked[:64], picked[64:]
    cls[i, pos] = rng.integers(1, num_classes, size=pos.size)
    cls[i, ignored] = -2
    box[i, pos] = rng.normal(0.0, 0.1, (pos.size, 4))
  y0 = rng.uniform(0, 0.6 * size, (b, n))
  x0 = rng.uniform(0, 0.6 * size, (b, n))
  bh = rng.uniform(0.1 * size, 0.4 * size, (b, n))
  bw = rng.uniform(0.1 * size, 0.4 * size, (b, n))
  boxes = np.stack([y0, x0, y0 + bh, x0 + bw], -1).astype(np.float32)
  cy, cx = y0 + bh / 2, x0 + bw / 2
  scale = float(kwargs["outer_box_scale"])
  outer = np.stack([cy - bh * scale / 2, cx - bw * scale / 2,
                    cy + bh * scale / 2, cx + bw * scale / 2], -1)
  outer = np.clip(outer, 0, size).astype(np.float32)
  images = rng.normal(0.0, 1.0, (b, size, size, 3)).astype(np.float32)
  labels = {
      "cls_targets": cls,
      "box_targets": box,
      "num_positives": np.full((b,), 64.0, np.float32),
      "image_info": np.tile(np.array(
          [[size, size], [size, size], [1, 1], [0, 0]], np.float32),
                            (b, 1, 1)),
      "mask_boxes": boxes,
      "mask_outer_boxes": outer,
      "mask_classes": rng.integers(1, num_classes, (b, n)).astype(np.int32),
      "mask_targets": (rng.random((b, n, m, m)) > 0.5).astype(np.float32),
      "fine_mask_targets": (rng.random((b, n, m * u, m * u)) > 0.5).astype(
          np.float32),
      "mask_is_valid": np.ones((b, n), np.float32),
  }
  return images, labels


# ------------------------------------------------------- worker sync (GPU)
@contextlib.contextmanager
def _timing_turn(spec):
  """Waits for every party to be compiled, then holds the timing lock."""
  sync_dir = spec.get("sync_dir")
  if not sync_dir:
    yield
    return
  import fcntl
  open(os.path.join(sync_dir, f"ready-{spec['id']}"), "w").close()
  deadline = time.time() + spec.get("barrier_timeout_s", 600)
  while time.time() < deadline:
    ready = [f for f in os.listdir(sync_dir) if f.startswith("ready-")]
    if len(ready) >= spec["num_parties"]:
      break
    time.sleep(0.2)
  with open(os.path.join(sync_dir, "timing.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


# -------------------------------------------------- TensorFlow: our model
def _tf_setup(spec):
  import tensorflow as tf
  threads = int(spec.get("threads") or 0)
  if threads:
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
  return tf


def _ours_tf_dataset(spec, kw):
  """Our parser over the synthetic records; `num_batches` cached batches."""
  from official_shapemask.dataloaders import input_reader
  from official_shapemask.dataloaders import shapemask_parser
  parser = shapemask_parser.Parser(
      output_size=kw["image_size"], min_level=kw["min_level"],
      max_level=kw["max_level"], num_scales=kw["num_scales"],
      aspect_ratios=tuple(kw["aspect_ratios"]),
      anchor_size=kw["anchor_size"], num_sampled_masks=kw["num_mask_slots"],
      mask_crop_size=kw["mask_crop_size"],
      upsample_factor=kw["upsample_factor"],
      outer_box_scale=kw["outer_box_scale"],
      use_bfloat16=spec["precision"] == "mixed_bfloat16", mode="train",
      seed=0)
  dataset = input_reader.build_dataset(
      spec["records"], parser, spec["batch_size"], is_training=True,
      deterministic=True, seed=0)
  return dataset.take(spec["num_batches"]).cache().repeat()


def _ours_tf_model(spec, strategy):
  import keras
  from official_shapemask.modeling import factory
  keras.mixed_precision.set_global_policy(spec["precision"])
  with strategy.scope():
    model = factory.build_shapemask_model(
        shape_prior_path=spec["prior_path"], **spec["model"])
  return model


def _redraw_class_predictor(spec, kernel, bias, seed=0):
  """Sets the RetinaNet class predictor for the inference measurements.

  `--infer_scores`:
  - `realistic` (default): kernel N(0, 0.01); bias -2 (scores ~0.12) for
    the `PRESENT_CLASSES` class channels of every anchor and -4.6 (scores
    ~0.01, the initial prior) for the others. As with a trained model on one
    image, a few classes have many candidates above the 0.05 threshold and
    most classes none; detections fill the 100 slots.
  - `full`: bias -2 for every class: every pre-NMS candidate of every class
    passes the threshold.
  - `init`: the initial predictor (every score ~0.01, no candidate passes).

  The predictor's channel `a * C + c` is anchor `a`, class `c` in both
  implementations (checked by the converter's parity test).
  """
  import numpy as np
  mode = spec.get("infer_scores", "realistic")
  if mode == "init":
    return
  rng = np.random.default_rng(seed)
  kernel.assign(rng.normal(0, 0.01, tuple(kernel.shape)).astype(np.float32))
  num_classes = int(spec["model"]["num_classes"])
  values = np.full((bias.shape[0] // num_classes, num_classes),
                   PRIOR_BIAS if mode == "realistic" else PRESENT_BIAS,
                   np.float32)
  if mode == "realistic":
    present = np.random.default_rng(seed).choice(
        np.arange(1, num_classes), size=min(PRESENT_CLASSES, num_classes - 1),
        replace=False)
    values[:, present] = PRESENT_BIAS
  bias.assign(values.reshape(-1))


def _tf_strategy(spec, tf):
  if spec.get("strategy") == "multi_worker":
    options = tf.distribute.experimental.CommunicationOptions(
        timeout_seconds=spec.get("collective_timeout_s", 600))
    return tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=options)
  return tf.distribute.OneDeviceStrategy("/cpu:0")


def worker_ours_train(spec):
  tf = _tf_setup(spec)
  import keras
  from official_shapemask.training import train_loop
  kw = spec["model"]
  strategy = _tf_strategy(spec, tf)
  t = time.perf_counter()
  model = _ours_tf_model(spec, strategy)
  with strategy.scope():
    optimizer = keras.optimizers.SGD(learning_rate=1e-3, momentum=0.9,
                                     nesterov=spec["nesterov"])
    optimizer.build(model.trainable_variables)
  build_s = time.perf_counter() - t
  dataset = strategy.distribute_datasets_from_function(
      lambda ctx: _ours_tf_dataset(spec, kw))
  iterator = iter(dataset)
  loop = train_loop.TrainLoop(strategy, model, optimizer,
                              gradient_clip_norm=spec["clip"],
                              jit_compile=False)
  t = time.perf_counter()
  losses = loop.run(iterator, 1)
  first = time.perf_counter() - t
  def step():
    losses.update(loop.run(iterator, 1))

  times = _timed_steps(step, spec["warmup"], spec["steps"])
  replicas = strategy.num_replicas_in_sync
  median = _median(times)
  return {
      "profile": _profile(spec, step),
      "build_s": round(build_s, 2), "first_step_s": round(first, 2),
      "median_step_s": round(median, 4),
      "images_per_s": round(spec["batch_size"] * replicas / median, 3),
      "replicas": replicas, "step_times_s": [round(x, 3) for x in times],
      "total_loss": round(losses["total_loss"], 4),
      "step": "TrainLoop.replica_step (custom tf.distribute loop)",
  }


def worker_ours_infer(spec):
  tf = _tf_setup(spec)
  strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
  t = time.perf_counter()
  model = _ours_tf_model(spec, strategy)
  build_s = time.perf_counter() - t
  _redraw_class_predictor(spec, model.head.class_predict.kernel,
                          model.head.class_predict.bias)
  images, labels = next(iter(_ours_tf_dataset(spec, spec["model"])))

  @tf.function
  def predict(images, image_info):
    out = model({"images": images, "image_info": image_info}, training=False)
    return out["num_detections"], out["detection_masks"]

  def step():
    num, masks = predict(images, labels["image_info"])
    step.num = num.numpy()
    masks.numpy()

  t = time.perf_counter()
  step()
  first = time.perf_counter() - t
  times = _timed_steps(step, spec["warmup"], spec["infer_steps"])
  median = _median(times)
  return {
      "profile": _profile(spec, step),
      "build_s": round(build_s, 2), "first_step_s": round(first, 2),
      "median_step_s": round(median, 4),
      "ms_per_image": round(1000 * median / spec["batch_size"], 2),
      "num_detections": [int(x) for x in step.num],
      "step_times_s": [round(x, 3) for x in times],
  }


# ------------------------------------------ TensorFlow: the Model Garden port
def _peer_setup(spec):
  tf = _tf_setup(spec)
  from official.legacy.detection.dataloader import input_reader
  from official.legacy.detection.dataloader import mode_keys
  from official_shapemask.serving import legacy_shapemask
  params = legacy_shapemask.legacy_params(
      spec["model"], batch_size=spec["batch_size"],
      shape_prior_path=spec["prior_path"],
      train_file_pattern=spec["records"], nesterov=spec["nesterov"])
  dataset = input_reader.InputFn(spec["records"], params, mode_keys.TRAIN,
                                 spec["batch_size"])()
  dataset = dataset.take(spec["num_batches"]).cache().repeat()
  return tf, params, dataset, legacy_shapemask


def worker_peer_train(spec):
  tf, params, dataset, legacy_shapemask = _peer_setup(spec)
  strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
  iterator = iter(strategy.experimental_distribute_dataset(dataset))
  t = time.perf_counter()
  with strategy.scope():
    model, builder = legacy_shapemask.build_legacy_model(params, "train")
    loss_fn = builder.build_loss_fn()
    optimizer = model.optimizer
    trainable = builder.make_filter_trainable_variables_fn()(
        model.trainable_variables)
  build_s = time.perf_counter() - t

  def replicated_step(inputs):
    # The body of the port's DetectionDistributedExecutor replicated step.
    inputs, labels = inputs
    with tf.GradientTape() as tape:
      outputs = model(inputs, training=True)
      all_losses = loss_fn(labels, outputs)
      losses = {k: tf.reduce_mean(v) for k, v in all_losses.items()}
      loss = losses["total_loss"] / strategy.num_replicas_in_sync
    grads = tape.gradient(loss, trainable)
    clipped, _ = tf.clip_by_global_norm(grads, clip_norm=1.0)
    optimizer.apply_gradients(zip(clipped, trainable))
    return losses

  @tf.function
  def train_step(it):
    per_replica = strategy.run(replicated_step, args=(next(it),))
    return tf.nest.map_structure(
        lambda x: strategy.reduce(tf.distribute.ReduceOp.MEAN, x, axis=None),
        per_replica)

  losses = {}

  def step():
    losses.update({k: float(v) for k, v in train_step(iterator).items()})

  t = time.perf_counter()
  step()
  first = time.perf_counter() - t
  times = _timed_steps(step, spec["warmup"], spec["steps"])
  median = _median(times)
  return {
      "profile": _profile(spec, step),
      "build_s": round(build_s, 2), "first_step_s": round(first, 2),
      "median_step_s": round(median, 4),
      "images_per_s": round(spec["batch_size"] / median, 3),
      "step_times_s": [round(x, 3) for x in times],
      "total_loss": round(losses["total_loss"], 4),
      "trainable_vars": f"{len(trainable)}/{len(model.trainable_variables)}",
      "step": "DetectionDistributedExecutor replicated step (clip 1.0)",
  }


def worker_peer_infer(spec):
  tf, params, dataset, legacy_shapemask = _peer_setup(spec)
  t = time.perf_counter()
  model, _ = legacy_shapemask.build_legacy_model(params, "predict")
  build_s = time.perf_counter() - t
  layer = model.get_layer("class-predict")
  _redraw_class_predictor(spec, layer.kernel, layer.bias)
  inputs, _ = next(iter(dataset))
  inputs = {"image": inputs["image"], "image_info": inputs["image_info"]}

  @tf.function
  def predict(inputs):
    out = model(inputs, training=False)
    return out["num_detections"], out["detection_masks"]

  def step():
    num, masks = predict(inputs)
    step.num = num.numpy()
    masks.numpy()

  t = time.perf_counter()
  step()
  first = time.perf_counter() - t
  times = _timed_steps(step, spec["warmup"], spec["infer_steps"])
  median = _median(times)
  return {
      "profile": _profile(spec, step),
      "build_s": round(build_s, 2), "first_step_s": round(first, 2),
      "median_step_s": round(median, 4),
      "ms_per_image": round(1000 * median / spec["batch_size"], 2),
      "num_detections": [int(x) for x in step.num],
      "step_times_s": [round(x, 3) for x in times],
  }


# ------------------------------------------------------------------- JAX
def _jax_model(spec):
  """Our model with the run's priors (set directly: the prior-file loader
  imports pycocotools and OpenCV, which a bare accelerator image lacks)."""
  import keras
  import numpy as np
  from official_shapemask.modeling import factory
  keras.mixed_precision.set_global_policy(spec["precision"])
  priors = np.load(spec["prior_path"])
  model = factory.build_shapemask_model(num_clusters=priors.shape[1],
                                        **spec["model"])
  model.prior_head.set_shape_priors(priors)
  return model


def _jax_device_peak_gib():
  import jax
  try:
    stats = jax.devices()[0].memory_stats() or {}
  except Exception:  # pylint: disable=broad-except
    stats = {}
  peak = stats.get("peak_bytes_in_use")
  return round(peak / 2**30, 3) if peak else None


def worker_jax_train(spec):
  import jax
  import keras
  import numpy as np
  t = time.perf_counter()
  model = _jax_model(spec)
  optimizer = keras.optimizers.SGD(learning_rate=1e-3, momentum=0.9)
  optimizer.build(model.trainable_variables)
  build_s = time.perf_counter() - t
  images, labels = synthetic_batch(spec["model"], spec["batch_size"])
  inputs = model.pack_inputs(images, labels)
  inputs, labels = jax.device_put((inputs, labels))
  trainable_vars = model.trainable_variables
  non_trainable_vars = model.non_trainable_variables

  def loss_fn(trainable, non_trainable, inputs, labels):
    mapping = list(zip(trainable_vars, trainable)) + list(
        zip(non_trainable_vars, non_trainable))
    with keras.StatelessScope(state_mapping=mapping) as scope:
      outputs = model(inputs, training=True)
      losses = model.compute_losses(labels, outputs)
    new_non_trainable = []
    for variable, old in zip(non_trainable_vars, non_trainable):
      value = scope.get_current_value(variable)
      new_non_trainable.append(old if value is None else value)
    return losses["total_loss"], new_non_trainable

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state, inputs, labels):
    trainable, non_trainable, opt_vars = state
    (loss, non_trainable), grads = grad_fn(trainable, non_trainable, inputs,
                                           labels)
    trainable, opt_vars = optimizer.stateless_apply(opt_vars, grads,
                                                    trainable)
    return (trainable, non_trainable, opt_vars), loss

  state = ([v.value for v in trainable_vars],
           [v.value for v in non_trainable_vars],
           [v.value for v in optimizer.variables])
  jitted = jax.jit(train_step, donate_argnums=0)
  t = time.perf_counter()
  compiled = jitted.lower(state, inputs, labels).compile()
  compile_s = time.perf_counter() - t
  box = {"state": state, "loss": None}

  def step():
    box["state"], box["loss"] = compiled(box["state"], inputs, labels)
    box["loss"].block_until_ready()

  with _timing_turn(spec):
    t = time.perf_counter()
    step()
    first = time.perf_counter() - t
    times = _timed_steps(step, spec["warmup"], spec["steps"])
  loss = float(box["loss"])
  if not np.isfinite(loss):
    raise FloatingPointError(f"non-finite loss {loss}")
  median = _median(times)
  return {
      "build_s": round(build_s, 2), "compile_s": round(compile_s, 2),
      "first_step_s": round(first, 3), "median_step_s": round(median, 4),
      "images_per_s": round(spec["batch_size"] / median, 2),
      "step_times_s": [round(x, 4) for x in times],
      "total_loss": round(loss, 4), "device": str(jax.devices()[0]),
      "device_peak_gib": _jax_device_peak_gib(),
      "step": "jax.jit(value_and_grad + optimizer.stateless_apply)",
  }


def worker_jax_infer(spec):
  import jax
  t = time.perf_counter()
  model = _jax_model(spec)
  build_s = time.perf_counter() - t
  _redraw_class_predictor(spec, model.head.class_predict.kernel,
                          model.head.class_predict.bias)
  images, labels = synthetic_batch(spec["model"], spec["batch_size"], seed=1)
  inputs = {"images": images, "image_info": labels["image_info"]}
  inputs = jax.device_put(inputs)
  trainable = [v.value for v in model.trainable_variables]
  non_trainable = [v.value for v in model.non_trainable_variables]

  def predict(trainable, non_trainable, inputs):
    outputs, _ = model.stateless_call(trainable, non_trainable, inputs,
                                      training=False)
    return outputs["num_detections"], outputs["detection_masks"]

  t = time.perf_counter()
  compiled = jax.jit(predict).lower(trainable, non_trainable,
                                    inputs).compile()
  compile_s = time.perf_counter() - t
  box = {}

  def step():
    box["num"], masks = compiled(trainable, non_trainable, inputs)
    masks.block_until_ready()

  with _timing_turn(spec):
    t = time.perf_counter()
    step()
    first = time.perf_counter() - t
    times = _timed_steps(step, spec["warmup"], spec["infer_steps"])
  median = _median(times)
  return {
      "build_s": round(build_s, 2), "compile_s": round(compile_s, 2),
      "first_step_s": round(first, 3), "median_step_s": round(median, 5),
      "ms_per_image": round(1000 * median / spec["batch_size"], 3),
      "num_detections": [int(x) for x in box["num"]],
      "step_times_s": [round(x, 5) for x in times],
      "device": str(jax.devices()[0]),
      "device_peak_gib": _jax_device_peak_gib(),
  }


# ----------------------------------------------------- PyTorch torchvision
def worker_torch_train(spec):
  import torch
  import torchvision
  size, batch = int(spec["model"]["image_size"]), spec["batch_size"]
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  torch.manual_seed(0)
  t = time.perf_counter()
  model = torchvision.models.detection.maskrcnn_resnet50_fpn(
      weights=None, weights_backbone=None, num_classes=91, min_size=size,
      max_size=size).to(device).train()
  optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
  build_s = time.perf_counter() - t
  gen = torch.Generator().manual_seed(0)
  images = [torch.randn(3, size, size, generator=gen).to(device)
            for _ in range(batch)]
  targets = []
  for _ in range(batch):
    n = 8
    xy = torch.rand(n, 2, generator=gen) * 0.6 * size
    wh = (0.1 + 0.3 * torch.rand(n, 2, generator=gen)) * size
    boxes = torch.cat([xy, xy + wh], 1)
    masks = torch.zeros(n, size, size, dtype=torch.uint8)
    for i, (x0, y0, x1, y1) in enumerate(boxes.round().int().tolist()):
      masks[i, y0:y1, x0:x1] = 1
    targets.append({"boxes": boxes.to(device),
                    "labels": torch.randint(1, 91, (n,), generator=gen).to(
                        device),
                    "masks": masks.to(device)})
  use_bf16 = spec["precision"] == "mixed_bfloat16"
  box = {}

  def step():
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
      losses = model(images, targets)
      loss = sum(losses.values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    box["loss"] = float(loss)  # Synchronises.

  with _timing_turn(spec):
    t = time.perf_counter()
    step()
    first = time.perf_counter() - t
    times = _timed_steps(step, spec["warmup"], spec["steps"])
  median = _median(times)
  peak = (round(torch.cuda.max_memory_allocated() / 2**30, 3)
          if device.type == "cuda" else None)
  return {
      "build_s": round(build_s, 2), "first_step_s": round(first, 3),
      "median_step_s": round(median, 4),
      "images_per_s": round(batch / median, 2),
      "step_times_s": [round(x, 4) for x in times],
      "total_loss": round(box["loss"], 4), "device": str(device),
      "device_peak_gib": peak, "torch": torch.__version__,
      "torchvision": torchvision.__version__, "notes": TORCH_PEER_NOTES,
  }


WORKERS = {
    "ours_train": worker_ours_train,
    "ours_infer": worker_ours_infer,
    "peer_train": worker_peer_train,
    "peer_infer": worker_peer_infer,
    "jax_train": worker_jax_train,
    "jax_infer": worker_jax_infer,
    "torch_train": worker_torch_train,
}


def run_worker(spec):
  """Entry point of a measurement subprocess; prints `RESULT {json}`."""
  t = time.perf_counter()
  try:
    result = WORKERS[spec["kind"]](spec)
    result["ok"] = True
  except Exception as e:  # pylint: disable=broad-except
    import traceback
    traceback.print_exc()
    result = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}
  result["peak_rss_gib"] = _peak_rss_gib()
  if _CPU_CORES_BUSY:
    result["cpu_cores_busy"] = (_CPU_CORES_BUSY[0] if len(_CPU_CORES_BUSY) == 1
                                else _CPU_CORES_BUSY)
  result["wall_s"] = round(time.perf_counter() - t, 1)
  print("RESULT " + json.dumps(result), flush=True)
  return 0 if result["ok"] else 1


# ------------------------------------------------------------ orchestrator
def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Runner:
  """Starts measurement subprocesses and records their JSON lines."""

  def __init__(self, args, workdir):
    self.args = args
    self.workdir = workdir
    self.records = []
    self._count = 0

  def _command(self, spec):
    return [sys.executable, os.path.abspath(__file__), "--_worker",
            json.dumps(spec)]

  def _env(self, extra=None):
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["KERAS_BACKEND"] = self.args.backend
    env["PYTHONPATH"] = _REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra or {})
    return env

  def start(self, spec, env=None):
    self._count += 1
    spec = dict(spec, id=self._count)
    log = os.path.join(self.workdir, f"worker-{self._count}-{spec['kind']}")
    out = open(log + ".log", "w")
    proc = subprocess.Popen(self._command(spec), stdout=out,
                            stderr=subprocess.STDOUT, env=self._env(env),
                            cwd=_REPO_ROOT)
    return {"spec": spec, "proc": proc, "log": log + ".log", "file": out,
            "start": time.time(), "load_start": os.getloadavg()[0]}

  def finish(self, job, timeout):
    """Waits (bounded) for a started job; returns its measurement record."""
    remaining = max(1.0, timeout - (time.time() - job["start"]))
    try:
      job["proc"].wait(timeout=remaining)
    except subprocess.TimeoutExpired:
      job["proc"].kill()
      job["proc"].wait()
    job["file"].close()
    return self._record(job, timeout)

  def _record(self, job, timeout):
    spec = job["spec"]
    with open(job["log"]) as f:
      text = f.read()
    lines = [l for l in text.splitlines() if l.startswith("RESULT ")]
    if lines:
      result = json.loads(lines[-1][len("RESULT "):])
    else:
      result = {"ok": False,
                "error": (f"no result (exit code {job['proc'].returncode}, "
                          f"timeout {timeout} s): " + text[-1500:])}
    if self._sync_dir(spec):  # A failed party must not hold up the others.
      open(os.path.join(spec["sync_dir"], f"ready-{spec['id']}"), "w").close()
    kind = spec["kind"]
    record = {
        "measure": kind.split("_")[1], "impl": spec["impl"],
        "backend": spec["backend"], "config": spec["config"],
        "image_size": spec["model"]["image_size"],
        "backbone_depth": spec["model"]["backbone_depth"],
        "batch_size": spec["batch_size"], "precision": spec["precision"],
        "date": _now(), "machine_cores": os.cpu_count(),
        "load_avg_1m_start": round(job["load_start"], 2),
        "load_avg_1m_end": round(os.getloadavg()[0], 2),
    }
    for key in ("strategy", "threads", "round", "worker_index",
                "num_workers"):
      if key in spec:
        record[key] = spec[key]
    if record["measure"] == "infer":
      record["infer_scores"] = spec.get("infer_scores", "realistic")
    record.update(result)
    self.emit(record)
    return record

  @staticmethod
  def _sync_dir(spec):
    return spec.get("sync_dir")

  def run(self, spec, timeout, env=None):
    return self.finish(self.start(spec, env), timeout)

  def run_parallel(self, specs, timeout):
    """All specs at once (compile in parallel, timed one at a time)."""
    sync_dir = tempfile.mkdtemp(prefix="sync-", dir=self.workdir)
    barrier = min(self.args.barrier_timeout or timeout, timeout)
    specs = [dict(s, sync_dir=sync_dir, num_parties=len(specs),
                  barrier_timeout_s=barrier) for s in specs]
    jobs = [self.start(s) for s in specs]
    pending, records = list(jobs), {}
    while pending:
      for job in list(pending):
        if job["proc"].poll() is not None or (
            time.time() - job["start"] > timeout):
          records[id(job)] = self.finish(job, timeout)
          pending.remove(job)
      time.sleep(0.5)
    return [records[id(j)] for j in jobs]

  def emit(self, record):
    self.records.append(record)
    print(json.dumps(record), flush=True)
    if self.args.output:
      tmp = self.args.output + ".tmp"
      with open(tmp, "w") as f:
        for r in self.records:
          f.write(json.dumps(r) + "\n")
      os.replace(tmp, self.args.output)


def _base_spec(args, kwargs, config_name, prior_path, records=None):
  return {
      "backend": args.backend, "config": config_name, "model": kwargs,
      "batch_size": args.batch_size, "precision": args.precision,
      "steps": args.steps, "warmup": args.warmup,
      "infer_steps": args.infer_steps, "num_batches": args.num_batches,
      "prior_path": prior_path, "records": records,
      "threads": args.threads, "clip": args.clip, "nesterov": args.nesterov,
      "infer_scores": args.infer_scores,
      "profile_dir": os.path.abspath(args.profile_dir) if args.profile_dir
                     else None,
  }


def _ok(record, key):
  return record is not None and record.get("ok") and record.get(key)


def _ratio(a, b):
  return round(a / b, 4) if a and b else None


def run_tensorflow(args, runner, base):
  """Ours (and the port with --peer), alternating, `--rounds` times."""
  impls = ["ours", "peer"] if args.peer else ["ours"]
  results = {(i, m): [] for i in impls for m in ("train", "infer")}
  measures = [m for m in ("train", "infer")
              if not (m == "train" and args.skip_train) and
              not (m == "infer" and args.skip_infer)]
  for r in range(args.rounds):
    for measure in measures:
      for impl in impls:
        spec = dict(base, kind=f"{impl}_{measure}", impl=impl, round=r)
        if impl == "peer":
          spec["precision"] = "float32"  # The port runs in float32 on CPU.
        results[(impl, measure)].append(runner.run(spec, args.timeout))
  summary = {"summary": True, "backend": "tensorflow",
             "config": base["config"], "image_size": base["model"]
             ["image_size"], "batch_size": base["batch_size"],
             "precision_ours": args.precision,
             "infer_scores": args.infer_scores, "date": _now()}

  def med(impl, measure, key):
    values = [r[key] for r in results[(impl, measure)] if _ok(r, key)]
    return _median(values)

  for impl in impls:
    summary[f"{impl}_train_step_s"] = med(impl, "train", "median_step_s")
    summary[f"{impl}_first_step_s"] = med(impl, "train", "first_step_s")
    summary[f"{impl}_infer_step_s"] = med(impl, "infer", "median_step_s")
    peaks = {m: [r["peak_rss_gib"] for r in results[(impl, m)]
                 if r.get("peak_rss_gib")] for m in ("train", "infer")}
    summary[f"{impl}_train_peak_gib"] = max(peaks["train"], default=None)
    summary[f"{impl}_infer_peak_gib"] = max(peaks["infer"], default=None)
    summary[f"{impl}_peak_gib"] = max(peaks["train"] + peaks["infer"],
                                      default=None)
  if args.peer:
    from official_shapemask.serving import legacy_shapemask
    summary["train_ratio"] = _ratio(summary["ours_train_step_s"],
                                    summary["peer_train_step_s"])
    summary["infer_ratio"] = _ratio(summary["ours_infer_step_s"],
                                    summary["peer_infer_step_s"])
    summary["peak_ratio"] = _ratio(summary["ours_peak_gib"],
                                   summary["peer_peak_gib"])
    summary["targets"] = {
        "train_ratio<=0.8": _le(summary["train_ratio"], 0.8),
        "infer_ratio<=0.3": _le(summary["infer_ratio"], 0.3),
        "ours_peak<peer_peak": _le(summary["peak_ratio"], 0.999999),
    }
    summary["not_equal"] = list(legacy_shapemask.UNEQUAL_SETTINGS)
  return summary


def _le(value, bound):
  return None if value is None else bool(value <= bound)


def run_workers(args, runner, base):
  """One process vs `--workers` MultiWorkerMirrored processes (loopback)."""
  n = args.workers
  threads = args.threads or max(1, (os.cpu_count() or 1) // n)
  base = dict(base, threads=threads, impl="ours")
  single = runner.run(dict(base, kind="ours_train", strategy="one_device",
                           num_workers=1), args.timeout)
  ports = [_free_port() for _ in range(n)]
  cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
  jobs = []
  for i in range(n):
    tf_config = json.dumps({"cluster": cluster,
                            "task": {"type": "worker", "index": i}})
    spec = dict(base, kind="ours_train", strategy="multi_worker",
                num_workers=n, worker_index=i,
                collective_timeout_s=args.timeout)
    jobs.append(runner.start(spec, env={"TF_CONFIG": tf_config}))
  multi = [runner.finish(job, args.timeout) for job in jobs]
  one = single.get("images_per_s") if single.get("ok") else None
  # Steps are synchronous: every worker sees the global throughput.
  many = [r.get("images_per_s") for r in multi if r.get("ok")]
  many = min(many) if len(many) == n else None
  return {
      "summary": True, "backend": "tensorflow", "config": base["config"],
      "measure": "scaling", "num_workers": n, "threads_per_process": threads,
      "per_replica_batch": base["batch_size"], "date": _now(),
      "single_images_per_s": one, "multi_images_per_s": many,
      "speedup": _ratio(many, one),
      "efficiency": _ratio(many, n * one) if one and many else None,
      "single_step_s": single.get("median_step_s"),
      "multi_step_s": _median([r["median_step_s"] for r in multi
                               if _ok(r, "median_step_s")]),
  }


def run_jax(args, runner, base):
  """Our model under JAX (and torchvision with --peer)."""
  specs = []
  for b in args.batch_sizes:
    specs.append(dict(base, kind="jax_train", impl="ours", batch_size=b))
  if not args.skip_infer:
    specs.append(dict(base, kind="jax_infer", impl="ours",
                      batch_size=args.infer_batch_size))
  if args.peer:
    for b in args.torch_batch_sizes or args.batch_sizes:
      specs.append(dict(base, kind="torch_train", impl="torchvision",
                        backend="torch", batch_size=b))
  if args.parallel:
    # The peer's eager PyTorch steps are sensitive to host load: they run
    # first, alone; then ours compile together and take turns on the device.
    # The whole stays within --timeout.
    start = time.time()
    records = [runner.run(s, args.timeout) for s in specs
               if s["kind"] == "torch_train"]
    ours = [s for s in specs if s["kind"] != "torch_train"]
    left = max(60, int(args.timeout - (time.time() - start)))
    records += runner.run_parallel(ours, left)
  else:
    records = [runner.run(s, args.timeout) for s in specs]
  summary = {"summary": True, "backend": "jax", "config": base["config"],
             "image_size": base["model"]["image_size"],
             "precision": args.precision, "date": _now()}
  for r in records:
    if not r.get("ok"):
      continue
    if r["measure"] == "train":
      summary[f"{r['impl']}_train_images_per_s_b{r['batch_size']}"] = (
          r["images_per_s"])
    else:
      summary[f"{r['impl']}_infer_ms_per_image_b{r['batch_size']}"] = (
          r["ms_per_image"])
  summary["failed"] = [f"{r['impl']} {r['measure']} b{r['batch_size']}: "
                       f"{r.get('error', '')[:300]}" for r in records
                       if not r.get("ok")]
  return summary


def parse_args(argv):
  p = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--backend", default="tensorflow",
                 choices=("tensorflow", "jax"))
  p.add_argument("--synthetic", action="store_true",
                 help="numpy synthetic batches (required for --backend=jax)")
  p.add_argument("--config", default=None, choices=sorted(CONFIGS),
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
  return args


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  if args._worker is not None:  # pylint: disable=protected-access
    spec = json.loads(args._worker)  # pylint: disable=protected-access
    return run_worker(spec)
  os.environ["KERAS_BACKEND"] = args.backend
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  config = args.config or (None if args.gin_file else "r50_256")
  overrides = {}
  if args.image_size:
    overrides["image_size"] = args.image_size
  kwargs = model_kwargs(config, args.gin_file, args.gin_bindings, overrides)
  kwargs.pop("num_clusters", None)
  default_batch = CONFIGS[config]["batch_size"] if config else 2
  args.batch_size = args.batch_size or default_batch
  args.batch_sizes = [int(b) for b in (args.batch_sizes or str(
      args.batch_size)).split(",")]
  if args.torch_batch_sizes:
    args.torch_batch_sizes = [int(b) for b in args.torch_batch_sizes.split(
        ",")]
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
  runner = Runner(args, workdir)
  print(json.dumps({
      "run": "benchmark", "date": _now(), "command": " ".join(
          ["python", "tools/benchmark.py"] + (argv if argv is not None else
                                              sys.argv[1:])),
      "machine": f"{os.cpu_count()} cores, {platform.machine()}, "
                 f"{platform.processor() or platform.platform()}",
      "load_avg": [round(x, 2) for x in os.getloadavg()],
      "model": kwargs, "workdir": workdir}), flush=True)
  prior_path = write_priors(os.path.join(workdir, "priors.npy"),
                            kwargs["num_classes"], args.num_clusters,
                            kwargs["mask_crop_size"])
  if args.backend == "jax":
    base = _base_spec(args, kwargs, config_name, prior_path)
    summary = run_jax(args, runner, base)
  else:
    records = write_synthetic_records(
        os.path.join(workdir, "synthetic.tfrecord"),
        max(8, args.batch_size * args.num_batches), kwargs["num_classes"])
    base = _base_spec(args, kwargs, config_name, prior_path, records)
    if args.workers:
      summary = run_workers(args, runner, base)
    else:
      summary = run_tensorflow(args, runner, base)
  summary["ours_settings"] = {"clip": args.clip, "nesterov": args.nesterov,
                              "freeze_early_norms": args.freeze_early_norms}
  failed = [r for r in runner.records if not r.get("ok")]
  runner.emit(summary)  # The last line.
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
