"""Shared pieces of the benchmark: configurations, synthetic data, timing.

Nothing here imports TensorFlow at module level (the accelerator machine's
JAX measurements run without it); `write_synthetic_records` and `profile`
import it when called.
"""

import contextlib
import datetime
import inspect
import json
import os
import resource
import statistics
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
GIN_DIR = os.path.join(REPO_ROOT, "gin")

# `build_shapemask_model` settings of the built-in configurations (the rest
# take that function's defaults: reference heads, levels 3-7, 91 classes).
CONFIGS = {
    "r50_256": dict(model=dict(backbone_depth=50, image_size=256),
                    batch_size=2),
    "r50_640": dict(model=dict(backbone_depth=50, image_size=640),
                    batch_size=2),
    "r101_1024": dict(model=dict(backbone_depth=101, image_size=1024),
                      batch_size=8),
    "r50_1024": dict(model=dict(backbone_depth=50, image_size=1024),
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
# torchvision variants (`--torch_variants`): parts joined by '+'.
TORCH_VARIANT_PARTS = ("eager", "channels_last", "compile", "compile_all")


def torch_variant_ok(variant):
  parts = variant.split("+")
  return bool(parts) and all(p in TORCH_VARIANT_PARTS for p in parts) and (
      "eager" not in parts or len(parts) == 1) and not (
          "compile" in parts and "compile_all" in parts)


# Inference load (see `_redraw_class_predictor`).
PRESENT_CLASSES = 5
PRESENT_BIAS = -2.0
PRIOR_BIAS = -4.595


# ---------------------------------------------------------------- helpers
def now():
  return datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")


def peak_rss_gib():
  return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)


def median(values):
  return float(statistics.median(values)) if values else None


# Process CPU seconds per wall second over the last `_timed_steps` call.
CPU_CORES_BUSY = []


def timed_steps(step, warmup, steps):
  """Runs `step()` warmup + steps times; returns the timed seconds.

  Also records in `CPU_CORES_BUSY` the process's CPU time (user + system,
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
    CPU_CORES_BUSY.append(
        round((time.process_time() - cpu) / sum(times), 2))
  return times


def profile(spec, step):
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
  gin.add_config_file_search_path(GIN_DIR)
  files = []
  for name in gin_files:
    candidates = [name, name + ".gin", os.path.join(GIN_DIR, name),
                  os.path.join(GIN_DIR, name + ".gin")]
    found = [c for c in candidates if os.path.isfile(c)]
    if not found:
      raise FileNotFoundError(f"gin file {name!r} not found (also looked in "
                              f"{GIN_DIR})")
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


def random_priors(num_classes, num_clusters, mask_crop_size, seed=0):
  """Random uniform shape priors `[C, K, m, m]` float32."""
  import numpy as np
  rng = np.random.default_rng(seed)
  return rng.uniform(0.0, 1.0, (num_classes, num_clusters, mask_crop_size,
                                mask_crop_size)).astype(np.float32)


def write_priors(path, num_classes, num_clusters, mask_crop_size, seed=0):
  """Random uniform shape priors `[C, K, m, m]` (both implementations)."""
  import numpy as np
  priors = random_priors(num_classes, num_clusters, mask_crop_size, seed)
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
def ready_file(spec):
  """The file a party of a `--parallel` run creates once it is compiled:
  `ready-main-<id>`, or `ready-extra-<id>` for the A/B extras."""
  kind = "extra" if spec.get("extra") else "main"
  return os.path.join(spec["sync_dir"], f"ready-{kind}-{spec['id']}")


@contextlib.contextmanager
def timing_turn(spec):
  """Waits for the main parties to be compiled, then holds the timing lock.

  The extras (`spec["extra"]`: the A/B variants, compiled at a lower CPU
  priority) do not hold up the main measurements: every party waits for
  the `num_main_parties` main ones only (at most `barrier_timeout_s`).
  """
  sync_dir = spec.get("sync_dir")
  if not sync_dir:
    yield
    return
  import fcntl
  open(ready_file(spec), "w").close()
  deadline = time.time() + spec.get("barrier_timeout_s", 600)
  while time.time() < deadline:
    ready = [f for f in os.listdir(sync_dir) if f.startswith("ready-main-")]
    if len(ready) >= spec["num_main_parties"]:
      break
    time.sleep(0.2)
  with open(os.path.join(sync_dir, "timing.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def redraw_class_predictor(spec, kernel, bias, seed=0):
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
