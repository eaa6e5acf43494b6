"""Static-shape greedy non-maximum suppression in keras.ops.

Works on any backend and compiles under XLA (``jit_compile=True``) and
``jax.jit``: the loop has a static bound and fixed-shape state.

Two forms of the loop, with the same results (`fixed_steps`): under
TensorFlow (graph execution on the host) a ``keras.ops.while_loop`` that
stops as soon as no candidate is left; under JAX a ``keras.ops.fori_loop``
over all ``max_output_size`` steps, whose trip count XLA knows. An XLA GPU
executable runs a loop of unknown trip count by copying its condition to
the host and waiting for it at every iteration; with a known count it
launches the iterations back to back. Steps after the candidates run out
change nothing (they find no best box and write what the padded slots
already hold).
"""

import keras
from keras import ops

from official_shapemask.ops import box_ops


def default_fixed_steps():
  """Whether the NMS loops run a fixed trip count (JAX) or exit early.

  Public so that benchmarks can switch the form (tools/bench/cost_analysis).
  """
  return keras.backend.backend() == "jax"


def non_max_suppression_padded(boxes,
                               scores,
                               max_output_size,
                               iou_threshold=0.5,
                               score_threshold=float("-inf"),
                               fixed_steps=None):
  """Exact greedy NMS for a batch of independent box sets, padded output.

  Semantics follow ``tf.image.non_max_suppression_padded`` as called by the
  reference post-processing (§9.3): a box is a candidate when its score is
  strictly greater than ``score_threshold``; candidates are visited in
  decreasing score order (ties: lower index first); a candidate is kept
  unless its IoU with an already kept box is strictly greater than
  ``iou_threshold``. IoU is ``box_ops.box_iou`` (plain sizes).

  Each loop step keeps the best remaining candidate of every set and removes
  the candidates it suppresses, so the cost is
  ``O(steps * prod(batch) * K)`` with at most ``max_output_size`` steps; the
  loop stops early once every set has run out of candidates. Scores need not
  be sorted.

  Args:
    boxes: float tensor ``[..., K, 4]``, ``[ymin, xmin, ymax, xmax]``.
    scores: float tensor ``[..., K]`` with the same leading dims.
    max_output_size: python int, the number of output slots.
    iou_threshold: python float.
    score_threshold: python float.
    fixed_steps: bool, always run ``max_output_size`` steps (a loop of
      known trip count) instead of stopping early; None: True under JAX,
      False under TensorFlow (see the module docstring). Same results.

  Returns:
    indices: int32 ``[..., max_output_size]``, positions (into K) of the kept
      boxes in decreasing score order; 0 in padded slots.
    valid: bool ``[..., max_output_size]``, True for real selections (always
      a prefix of the slots).
  """
  if boxes.shape[-1] != 4:
    raise ValueError(
        f"non_max_suppression_padded: boxes need a last dimension of 4, got "
        f"shape {boxes.shape}")
  max_output_size = int(max_output_size)
  num_boxes = boxes.shape[-2]
  if num_boxes is None:
    raise ValueError(
        "non_max_suppression_padded: the number of boxes K must be static.")
  batch_shape = ops.shape(scores)[:-1]
  boxes = ops.reshape(ops.cast(boxes, "float32"), (-1, num_boxes, 4))
  scores = ops.reshape(ops.cast(scores, "float32"), (-1, num_boxes))

  positions = ops.arange(num_boxes, dtype="int32")[None, :]
  slots = ops.arange(max_output_size, dtype="int32")[None, :]
  neg_inf = ops.full_like(scores, float("-inf"))

  alive = scores > score_threshold
  indices = ops.zeros_like(slots) + ops.zeros_like(scores[:, :1], "int32")
  valid = ops.zeros_like(indices, dtype="bool")

  def cond(step, alive, unused_indices, unused_valid):
    return ops.logical_and(step < max_output_size, ops.any(alive))

  def body(step, alive, indices, valid):
    step = ops.cast(step, "int32")
    best = ops.cast(ops.argmax(ops.where(alive, scores, neg_inf), axis=-1),
                    "int32")  # [M]
    has_best = ops.any(alive, axis=-1)  # [M]
    is_best = ops.equal(positions, best[:, None])  # [M, K]
    best_box = ops.sum(
        ops.where(is_best[:, :, None], boxes, ops.zeros_like(boxes)),
        axis=1, keepdims=True)  # [M, 1, 4]
    iou = box_ops.box_iou(best_box, boxes)[:, 0, :]  # [M, K]
    alive = ops.logical_and(
        alive,
        ops.logical_and(iou <= iou_threshold, ops.logical_not(is_best)))
    in_slot = ops.equal(slots, step)  # [1, S]
    indices = ops.where(in_slot, ops.where(has_best, best, 0)[:, None],
                        indices)
    valid = ops.where(in_slot, has_best[:, None], valid)
    return step + 1, alive, indices, valid

  if fixed_steps is None:
    fixed_steps = default_fixed_steps()
  if fixed_steps:
    alive, indices, valid = ops.fori_loop(
        0, max_output_size, lambda step, state: body(step, *state)[1:],
        (alive, indices, valid))
  else:
    _, _, indices, valid = ops.while_loop(
        cond, body,
        (ops.convert_to_tensor(0, "int32"), alive, indices, valid))
  out_shape = tuple(batch_shape) + (max_output_size,)
  return ops.reshape(indices, out_shape), ops.reshape(valid, out_shape)


def multiclass_non_max_suppression_padded(boxes,
                                          scores,
                                          max_output_size,
                                          iou_threshold=0.5,
                                          score_threshold=float("-inf"),
                                          fixed_steps=None):
  """Per-class greedy NMS followed by a global top-k, in one greedy pass.

  Returns exactly what running ``non_max_suppression_padded`` on every class
  separately (each with ``max_output_size`` slots), concatenating the kept
  boxes of all classes in class order and taking the ``max_output_size``
  highest scores gives (reference §9.3): picking, again and again, the
  highest-scoring live candidate over *all* classes and suppressing only
  within its class visits every class's candidates in that class's score
  order, so each class's picks are its greedy NMS picks, and the picks come
  out in decreasing score order. Ties go to the lower class, then the lower
  position, as with a stable top-k over the class-major concatenation.

  Each step costs one argmax and one mask update over ``C * K`` plus one
  IoU row of ``K``; there are at most ``max_output_size`` steps.

  Args:
    boxes: float tensor ``[B, C, K, 4]``: K candidates for each of C classes.
    scores: float tensor ``[B, C, K]``.
    max_output_size: python int, total output slots per image.
    iou_threshold: python float; suppression needs IoU > threshold.
    score_threshold: python float; candidates need score > threshold.
    fixed_steps: bool, always run ``max_output_size`` steps (a loop of
      known trip count) instead of stopping once no candidate is left;
      None: True under JAX, False under TensorFlow. Same results.

  Returns:
    class_ids: int32 ``[B, max_output_size]``, the class (0..C-1) of each
      pick; 0 in padded slots.
    indices: int32 ``[B, max_output_size]``, the pick's position in K; 0 in
      padded slots.
    valid: bool ``[B, max_output_size]``, True for real picks (a prefix).
  """
  if len(boxes.shape) != 4 or boxes.shape[-1] != 4:
    raise ValueError(
        f"multiclass_non_max_suppression_padded: boxes must be [B, C, K, 4], "
        f"got shape {boxes.shape}")
  num_classes, num_boxes = boxes.shape[1], boxes.shape[2]
  if num_classes is None or num_boxes is None:
    raise ValueError(
        "multiclass_non_max_suppression_padded: C and K must be static.")
  max_output_size = int(max_output_size)
  total = num_classes * num_boxes
  boxes = ops.cast(boxes, "float32")
  scores = ops.cast(scores, "float32")

  flat_boxes = ops.reshape(boxes, (-1, 4))  # [B * C * K, 4]
  row_boxes = ops.reshape(boxes, (-1, num_boxes, 4))  # [B * C, K, 4]
  batch = ops.shape(scores)[0]
  image_offsets = ops.arange(batch, dtype="int32")
  class_range = ops.arange(num_classes, dtype="int32")[None, :, None]
  position_range = ops.arange(num_boxes, dtype="int32")[None, :]
  slots = ops.arange(max_output_size, dtype="int32")[None, :]
  neg_inf = float("-inf")

  live = ops.where(scores > score_threshold, scores, neg_inf)  # [B, C, K]
  out_zeros = ops.zeros_like(slots) + ops.zeros_like(
      ops.cast(scores[:, 0, :1], "int32"))
  out_valid = ops.zeros_like(out_zeros, dtype="bool")

  def cond(step, keep_going, *unused):
    return ops.logical_and(step < max_output_size, keep_going)

  def body(step, unused_keep_going, live, out_class, out_index, out_valid):
    step = ops.cast(step, "int32")
    live_flat = ops.reshape(live, (-1, total))
    best = ops.cast(ops.argmax(live_flat, axis=-1), "int32")  # [B]
    best_score = ops.take_along_axis(live_flat, best[:, None], axis=1)[:, 0]
    has_best = best_score > neg_inf  # [B]
    best_class = best // num_boxes
    best_pos = best - best_class * num_boxes
    best_box = ops.take(flat_boxes, image_offsets * total + best, axis=0)
    candidates = ops.take(row_boxes, image_offsets * num_classes + best_class,
                          axis=0)  # [B, K, 4]
    iou = box_ops.box_iou(best_box[:, None, :], candidates)[:, 0, :]
    suppress = ops.logical_or(iou > iou_threshold,
                              ops.equal(position_range, best_pos[:, None]))
    suppress = ops.logical_and(suppress, has_best[:, None])  # [B, K]
    in_class = ops.equal(class_range, best_class[:, None, None])  # [B, C, 1]
    live = ops.where(ops.logical_and(in_class, suppress[:, None, :]), neg_inf,
                     live)
    in_slot = ops.equal(slots, step)
    out_class = ops.where(in_slot, ops.where(has_best, best_class, 0)[:, None],
                          out_class)
    out_index = ops.where(in_slot, ops.where(has_best, best_pos, 0)[:, None],
                          out_index)
    out_valid = ops.where(in_slot, has_best[:, None], out_valid)
    return (step + 1, ops.any(has_best), live, out_class, out_index,
            out_valid)

  if fixed_steps is None:
    fixed_steps = default_fixed_steps()
  if fixed_steps:
    _, out_class, out_index, out_valid = ops.fori_loop(
        0, max_output_size,
        lambda step, state: body(step, None, *state)[2:],
        (live, out_zeros, out_zeros, out_valid))
    return out_class, out_index, out_valid
  init = (ops.convert_to_tensor(0, "int32"), ops.any(live > neg_inf), live,
          out_zeros, out_zeros, out_valid)
  _, _, _, out_class, out_index, out_valid = ops.while_loop(cond, body, init)
  return out_class, out_index, out_valid
