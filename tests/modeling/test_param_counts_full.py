"""Parameter counts of the full R50 / R101 ShapeMask models equal those of
tf-models-official's legacy ShapeMask (`official.legacy.detection`), per
component, built with the settings of the legacy config (91 classes, levels
3-7, 256 FPN/head filters, 4-conv heads, 128 mask channels, 4-conv mask
heads, upsample 4) and the same `[91, 20, 32, 32]` prior file.

Known differences, each accounted for by name below:
- our `ShapePriorHead` keeps the priors as the non-trainable weight
  `shape_priors` (91 * 20 * 32 * 32 values, saved with the checkpoint); the
  legacy head uses a constant loaded from the `.npy` on every call;
- freezing: ours freezes the 11 stem + conv2_x conv kernels (the TF1
  reference's regex); the legacy executor's filter also freezes the 11 batch
  norms of those convs (its gammas and betas).

The legacy model is Keras 2 (tf_keras): it is built in a subprocess so that
Keras 2 and Keras 3 never share a process.
"""
import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from official_shapemask.modeling import build_shapemask_model

pytestmark = pytest.mark.slow  # The legacy builds take ~40 s of CPU.

DEPTHS = (50, 101)
NUM_CLASSES, NUM_CLUSTERS, MASK_SIZE = 91, 20, 32
SIZE = 128  # Counts do not depend on the image size.
PARTS = ("backbone", "decoder", "head", "prior_head", "coarse_head",
         "fine_head")
PRIOR_VALUES = NUM_CLASSES * NUM_CLUSTERS * MASK_SIZE * MASK_SIZE

# Builds the legacy model the way /work/shared/tools/peer_legacy_shapemask.py
# does (config_factory 'shapemask' + overrides, model_factory, TRAIN mode) and
# prints per-component [trainable, non-trainable] counts, grouped by the
# legacy layer names, and the variables its frozen-variable filter removes.
_LEGACY_SCRIPT = textwrap.dedent(r"""
    import json
    import os
    import re
    import sys
    import tempfile

    import numpy as np
    import tensorflow as tf
    import tf_keras
    from official.legacy.detection.configs import factory as config_factory
    from official.legacy.detection.dataloader import mode_keys
    from official.legacy.detection.modeling import factory as model_factory

    prior_path, size, depths = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    GROUPS = [
        ("prior_head", r"(classify-)?shape-prior-fc/"),
        ("coarse_head", r"coarse-mask-"),
        ("fine_head", r"fine-mask-"),
        ("head", r"(class|box)-"),
        ("decoder", r"(l[3-7]|post_hoc_d[3-7]|p[3-7](-bn)?)/"),
        ("backbone", r"(conv2d|batch_normalization)(_\d+)?/"),
    ]

    def part_of(name):
      for part, pattern in GROUPS:
        if re.match(pattern, name):
          return part
      raise SystemExit(f"legacy weight {name} matches no component")

    out = {}
    for depth in depths:
      tf_keras.backend.clear_session()
      params = config_factory.config_generator("shapemask")
      params.override({
          "model_dir": tempfile.mkdtemp(),
          "use_tpu": False,
          "strategy_type": "one_device",
          "architecture": {"use_bfloat16": False, "num_classes": 91},
          "resnet": {"resnet_depth": int(depth)},
          "train": {"batch_size": 1},
          "eval": {"batch_size": 1},
          "shapemask_parser": {"output_size": [size, size]},
          "shapemask_head": {"shape_prior_path": prior_path},
      }, is_strict=True)
      params.validate()
      params.lock()
      builder = model_factory.model_generator(params)
      model = builder.build_model(params, mode=mode_keys.TRAIN)
      counts = {part: [0, 0] for part, _ in GROUPS}
      for w in model.weights:
        counts[part_of(w.name)][0 if w.trainable else 1] += int(
            np.prod(w.shape))
      kept = {id(v) for v in
              builder.make_filter_trainable_variables_fn()(
                  model.trainable_variables)}
      frozen = [(w.name, [int(d) for d in w.shape])
                for w in model.trainable_variables if id(w) not in kept]
      out[depth] = {"parts": counts, "frozen": frozen,
                    "count_params": int(model.count_params())}
    print("LEGACY" + json.dumps(out))
""")


@pytest.fixture(scope="module")
def prior_path(tmp_path_factory):
  path = tmp_path_factory.mktemp("priors") / "priors_91x20x32x32.npy"
  rng = np.random.default_rng(0)
  np.save(path, rng.uniform(size=(NUM_CLASSES, NUM_CLUSTERS, MASK_SIZE,
                                  MASK_SIZE)).astype(np.float32))
  return str(path)


@pytest.fixture(scope="module")
def legacy(prior_path):
  pytest.importorskip("official.legacy.detection.modeling.factory")
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
  proc = subprocess.run(
      [sys.executable, "-c", _LEGACY_SCRIPT, prior_path, str(SIZE),
       *map(str, DEPTHS)],
      capture_output=True, text=True, env=env, timeout=900, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("LEGACY")]
  assert proc.returncode == 0 and lines, (
      "building the legacy tf-models-official ShapeMask failed:\n"
      f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
  return json.loads(lines[-1][len("LEGACY"):])


def _size(variable):
  return int(np.prod(variable.shape))


def _ours(depth, prior_path, freeze_early_convs, freeze_early_norms=False):
  model = build_shapemask_model(
      num_classes=NUM_CLASSES, image_size=SIZE, backbone_depth=depth,
      shape_prior_path=prior_path, freeze_early_convs=freeze_early_convs,
      freeze_early_norms=freeze_early_norms)
  parts = {
      part: [sum(_size(v) for v in getattr(model, part).trainable_weights),
             sum(_size(v) for v in getattr(model, part).non_trainable_weights)]
      for part in PARTS
  }
  # Nothing outside the six parts holds weights.
  assert sum(t + n for t, n in parts.values()) == sum(
      _size(v) for v in model.weights)
  return model, parts


@pytest.mark.parametrize("depth", DEPTHS)
def test_counts_equal_legacy_per_component(depth, prior_path, legacy):
  model, ours = _ours(depth, prior_path, freeze_early_convs=False)
  theirs = legacy[str(depth)]["parts"]
  # The one extra weight: the priors, non-trainable, in the prior head.
  priors = model.prior_head.shape_priors
  assert re.fullmatch(r"shapemask/shape_prior_head(_\d+)?/shape_priors",
                      priors.path), priors.path
  assert tuple(priors.shape) == (NUM_CLASSES, NUM_CLUSTERS, MASK_SIZE,
                                 MASK_SIZE)
  assert not priors.trainable
  ours["prior_head"][1] -= _size(priors)
  assert ours == theirs
  trainable = sum(t for t, _ in ours.values())
  non_trainable = sum(n for _, n in ours.values())
  assert trainable + non_trainable == legacy[str(depth)]["count_params"]
  # The totals the reference reports (R50: 35.8M trainable).
  assert trainable == {50: 35_827_817, 101: 54_819_945}[depth]
  assert _size(priors) == PRIOR_VALUES


@pytest.mark.parametrize("depth", DEPTHS)
def test_frozen_variables_versus_legacy_filter(depth, prior_path, legacy):
  model, ours = _ours(depth, prior_path, freeze_early_convs=True)
  frozen_kernels = [v for v in model.backbone.non_trainable_weights
                    if v.path.endswith("kernel")]
  legacy_frozen = legacy[str(depth)]["frozen"]
  legacy_kernels = [shape for name, shape in legacy_frozen
                    if name.endswith("kernel:0")]
  legacy_bn = [(name, shape) for name, shape in legacy_frozen
               if not name.endswith("kernel:0")]
  # The same 11 conv kernels (stem + conv2_x) are frozen...
  assert len(frozen_kernels) == 11
  assert sorted(list(v.shape) for v in frozen_kernels) == sorted(
      legacy_kernels)
  # ...and the legacy filter also freezes those convs' 11 batch norms
  # (gamma and beta), which ours, like the TF1 reference, keeps trainable.
  assert len(legacy_bn) == 22
  assert all(name.startswith("batch_normalization") and
             name.split("/")[-1] in ("gamma:0", "beta:0")
             for name, _ in legacy_bn)
  frozen_bn_values = sum(int(np.prod(shape)) for _, shape in legacy_bn)
  legacy_trainable_after_filter = (
      sum(t for t, _ in legacy[str(depth)]["parts"].values()) -
      sum(int(np.prod(shape)) for _, shape in legacy_frozen))
  trainable = sum(t for t, _ in ours.values())
  assert trainable == legacy_trainable_after_filter + frozen_bn_values
  # With freeze_early_norms (the benchmark's --peer setting) ours trains
  # exactly the port's variables.
  _, ours_port_freeze = _ours(depth, prior_path, freeze_early_convs=True,
                              freeze_early_norms=True)
  assert sum(t for t, _ in ours_port_freeze.values()) == (
      legacy_trainable_after_filter)
