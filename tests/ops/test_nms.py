"""Greedy NMS against a numpy reference and TensorFlow's padded NMS (§9.3)."""
import numpy as np
import pytest

from official_shapemask.ops import nms


def _iou(box, boxes):
  ih = np.clip(np.minimum(box[2], boxes[:, 2]) -
               np.maximum(box[0], boxes[:, 0]), 0, None)
  iw = np.clip(np.minimum(box[3], boxes[:, 3]) -
               np.maximum(box[1], boxes[:, 1]), 0, None)
  inter = ih * iw
  area = (box[2] - box[0]) * (box[3] - box[1])
  areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  return inter / (area + areas - inter + 1e-8)


def _numpy_greedy_nms(boxes, scores, max_out, iou_thr, score_thr):
  keep = []
  for i in np.argsort(-scores, kind="stable"):
    if scores[i] <= score_thr:
      break
    if keep and np.any(_iou(boxes[i], boxes[keep]) > iou_thr):
      continue
    keep.append(int(i))
    if len(keep) == max_out:
      break
  return keep


def _clustered_boxes(rng, n, canvas=128.0):
  """Boxes around a few centres so that NMS has plenty to suppress."""
  centres = rng.uniform(20, canvas - 20, (6, 2))
  c = centres[rng.integers(0, 6, n)] + rng.normal(0, 4, (n, 2))
  hw = rng.uniform(8, 40, (n, 2))
  return np.concatenate([c - hw / 2, c + hw / 2], -1).astype(np.float32)


@pytest.mark.parametrize("fixed_steps", [False, True])
@pytest.mark.parametrize("score_thr", [float("-inf"), 0.3])
def test_matches_numpy_greedy_on_random_boxes(score_thr, fixed_steps):
  rng = np.random.default_rng(1)
  batch, k, max_out = 4, 300, 40
  boxes = np.stack([_clustered_boxes(rng, k) for _ in range(batch)])
  scores = rng.uniform(0, 1, (batch, k)).astype(np.float32)  # unsorted
  idx, valid = nms.non_max_suppression_padded(boxes, scores, max_out, 0.5,
                                              score_thr,
                                              fixed_steps=fixed_steps)
  idx, valid = np.asarray(idx), np.asarray(valid)
  assert idx.shape == (batch, max_out) and idx.dtype == np.int32
  assert valid.dtype == bool
  for b in range(batch):
    expected = _numpy_greedy_nms(boxes[b], scores[b], max_out, 0.5, score_thr)
    n = int(valid[b].sum())
    assert valid[b, :n].all() and not valid[b, n:].any()  # a prefix
    assert idx[b, :n].tolist() == expected
    assert (idx[b, n:] == 0).all()


def test_leading_batch_dims_and_thresholds_are_strict():
  # IoU exactly 0.5 is kept (suppression needs IoU > threshold); a score
  # equal to the threshold is not a candidate.
  boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 20], [0, 0, 10, 10.5],
                    [50, 50, 60, 60]], np.float32)
  scores = np.array([0.9, 0.8, 0.7, 0.3], np.float32)
  idx, valid = nms.non_max_suppression_padded(
      np.stack([boxes, boxes])[None], np.stack([scores, scores])[None], 4,
      iou_threshold=0.5, score_threshold=0.3)
  assert idx.shape == (1, 2, 4)
  idx, valid = np.asarray(idx)[0, 0], np.asarray(valid)[0, 0]
  assert idx[valid].tolist() == [0, 1]


def test_agrees_with_tensorflow_padded_nms():
  tf = pytest.importorskip("tensorflow")
  rng = np.random.default_rng(2)
  boxes = _clustered_boxes(rng, 500)
  scores = np.sort(rng.uniform(0, 1, 500).astype(np.float32))[::-1].copy()
  ref_idx, ref_n = tf.image.non_max_suppression_padded(
      boxes, scores, 100, iou_threshold=0.5, score_threshold=0.05,
      pad_to_max_output_size=True)
  idx, valid = nms.non_max_suppression_padded(boxes[None], scores[None], 100,
                                              0.5, 0.05)
  n = int(ref_n)
  assert int(np.asarray(valid).sum()) == n
  assert np.asarray(idx)[0, :n].tolist() == ref_idx.numpy()[:n].tolist()


@pytest.mark.parametrize("fixed_steps", [False, True])
def test_multiclass_equals_per_class_nms_then_global_top_k(fixed_steps):
  rng = np.random.default_rng(3)
  batch, classes, k, max_out = 2, 5, 120, 30
  boxes = np.stack([
      np.stack([_clustered_boxes(rng, k) for _ in range(classes)])
      for _ in range(batch)
  ])
  scores = rng.uniform(0, 1, (batch, classes, k)).astype(np.float32)
  scores[1, 2] = 0.01  # a class with no candidate at all
  scores[0, :, 100:] = 0.0  # image 0 runs out of candidates before max_out
  cls, idx, valid = nms.multiclass_non_max_suppression_padded(
      boxes, scores, max_out, iou_threshold=0.5, score_threshold=0.2,
      fixed_steps=fixed_steps)
  cls, idx, valid = np.asarray(cls), np.asarray(idx), np.asarray(valid)
  for b in range(batch):
    picks = []
    for c in range(classes):
      keep = _numpy_greedy_nms(boxes[b, c], scores[b, c], max_out, 0.5, 0.2)
      picks += [(-scores[b, c, i], c, i) for i in keep]
    expected = sorted(picks)[:max_out]
    n = int(valid[b].sum())
    assert n == len(expected)
    got = list(zip(cls[b, :n].tolist(), idx[b, :n].tolist()))
    assert got == [(c, i) for _, c, i in expected]


def test_compiles_under_xla():
  tf = pytest.importorskip("tensorflow")
  rng = np.random.default_rng(4)
  boxes = np.stack([_clustered_boxes(rng, 200) for _ in range(2)])
  scores = rng.uniform(0, 1, (2, 200)).astype(np.float32)
  fn = tf.function(
      lambda b, s: nms.non_max_suppression_padded(b, s, 20, 0.5, 0.1),
      jit_compile=True)
  idx, valid = fn(boxes, scores)
  for b in range(2):
    expected = _numpy_greedy_nms(boxes[b], scores[b], 20, 0.5, 0.1)
    n = int(valid.numpy()[b].sum())
    assert idx.numpy()[b, :n].tolist() == expected


_JAX_SCRIPT = """
import jax, numpy as np
from official_shapemask.ops import nms
rng = np.random.default_rng(5)
boxes = rng.uniform(0, 100, (2, 4, 60, 2)).astype(np.float32)
boxes = np.concatenate([boxes, boxes + rng.uniform(5, 30, boxes.shape)], -1)
scores = rng.uniform(0, 1, (2, 4, 60)).astype(np.float32)
scores[1] = 0.0  # no candidate in image 1: the fixed loop still runs 25 steps
outs, texts = [], []
for fixed in (None, False):
  fn = jax.jit(lambda b, s: nms.multiclass_non_max_suppression_padded(
      b, s, 25, 0.5, 0.3, fixed_steps=fixed))
  compiled = fn.lower(boxes, scores).compile()
  texts.append(compiled.as_text())
  outs.append([np.asarray(t) for t in compiled(boxes, scores)])
for a, b in zip(*outs):
  np.testing.assert_array_equal(a, b)
assert outs[0][2][0].sum() > 0 and not outs[0][2][1].any()
assert '"known_trip_count":{"n":"25"}' in texts[0].replace(" ", ""), "fixed"
assert "known_trip_count" not in texts[1]
print("JAX_NMS_OK")
"""


def test_jax_default_is_a_loop_of_known_trip_count(run_under_jax):
  result = run_under_jax(_JAX_SCRIPT, timeout=300)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert "JAX_NMS_OK" in result.stdout
