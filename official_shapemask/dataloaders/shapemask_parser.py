"""ShapeMask parser: serialized tf.Example -> ``(image, labels)`` (spec 7.2/7.3).

The output tensors follow ``docs/contracts.md`` (per example, without the
batch dimension). Boxes are ``[ymin, xmin, ymax, xmax]`` float32 in pixels of
the padded ``S x S`` canvas unless stated otherwise.

Reused from Model Garden (``official.vision.ops``): ``normalize_image``,
``horizontal_flip_image``, ``horizontal_flip_masks``,
``box_ops.horizontal_flip_boxes``, ``box_ops.denormalize_boxes``.

Written here because Model Garden's versions differ from the reference:
- ``image_ops.resize_and_crop_image`` (shared with the SavedModel export):
  ``preprocess_ops.resize_and_crop_image`` does the same arithmetic but draws
  its scale and crop offset with stateful ``tf.random`` ops; under a parallel
  ``map`` those cannot be made reproducible, so ours takes a stateless seed.
- ``_clip_boxes``: ``box_ops.clip_boxes`` (and therefore
  ``preprocess_ops.resize_and_crop_boxes`` and ``box_ops.compute_outer_boxes``)
  clip to ``[0, S]``; the reference clips to ``[0, S - 1]``.
- ``_jitter_boxes``: same formula as ``box_ops.jitter_boxes`` but with
  stateless noise.
- Random flip: ``preprocess_ops.random_horizontal_flip`` uses a stateful coin;
  ours draws it statelessly and flips with the Model Garden helpers.
"""

import gin
import tensorflow as tf

from official.vision.ops import box_ops
from official.vision.ops import preprocess_ops
from official_shapemask.dataloaders import anchor_labeler
from official_shapemask.dataloaders import class_ids
from official_shapemask.dataloaders import image_ops
from official_shapemask.dataloaders import tf_example_decoder

# COCO category ids of the 20 PASCAL VOC classes (reference class_utils).
VOC_CLASS_IDS = (1, 2, 3, 4, 5, 6, 7, 9, 16, 17, 18, 19, 20, 21, 44, 62, 63,
                 64, 67, 72)
_MODES = ('train', 'eval')
_MASK_TRAIN_CLASSES = ('all', 'voc', 'nonvoc')
# 'pad_2020': the reference since tensorflow/tpu commit 3929aef (2020-04-29);
# 'seed_2019': the parser behind the seed's benchmark numbers (Nov 2019).
MASK_SAMPLERS = ('pad_2020', 'seed_2019')
_INT31_MAX = 2**31 - 1


def _clip_boxes(boxes, size):
  """Clips ``[..., 4]`` boxes to ``[0, size - 1]`` (reference convention)."""
  height, width = size
  limit = tf.constant([height - 1.0, width - 1.0, height - 1.0, width - 1.0],
                      boxes.dtype)
  return tf.maximum(tf.minimum(boxes, limit), 0.0)


def _jitter_boxes(boxes, noise_scale, seed):
  """Reference box jitter with stateless noise ``N(0, noise_scale^2)``.

  Moves the centre by ``eps0 * w`` (x) and ``eps1 * h`` (y) and scales the
  width by ``exp(eps2)`` and the height by ``exp(eps3)``.

  Args:
    boxes: float32 ``[N, 4]`` (static ``N``).
    noise_scale: python float, standard deviation of the noise.
    seed: int ``[2]`` stateless seed.

  Returns:
    float32 ``[N, 4]`` jittered boxes (not clipped).
  """
  noise = tf.random.stateless_normal(boxes.shape, seed, stddev=noise_scale)
  ymin, xmin, ymax, xmax = tf.unstack(boxes, axis=-1)
  width = xmax - xmin
  height = ymax - ymin
  center_x = (xmin + xmax) / 2.0 + noise[:, 0] * width
  center_y = (ymin + ymax) / 2.0 + noise[:, 1] * height
  width = width * tf.exp(noise[:, 2])
  height = height * tf.exp(noise[:, 3])
  return tf.stack([center_y - height / 2.0, center_x - width / 2.0,
                   center_y + height / 2.0, center_x + width / 2.0], axis=-1)


def _outer_boxes(boxes, scale, size):
  """Boxes scaled by ``scale`` about their centres, clipped to the canvas."""
  ymin, xmin, ymax, xmax = tf.unstack(boxes, axis=-1)
  center_y = (ymin + ymax) / 2.0
  center_x = (xmin + xmax) / 2.0
  half_h = (ymax - ymin) * scale / 2.0
  half_w = (xmax - xmin) * scale / 2.0
  outer = tf.stack([center_y - half_h, center_x - half_w,
                    center_y + half_h, center_x + half_w], axis=-1)
  return _clip_boxes(outer, size)


def _sample_mask_slots(num_masks, num_slots, sampler, seed):
  """Draws the instance behind each mask slot.

  ``'pad_2020'``: a random permutation of the ``n`` instances, clipped to
  ``num_slots`` or padded with empty slots. ``'seed_2019'``: a random
  permutation of ``range(max(n, num_slots))`` taken modulo ``n`` and clipped
  to ``num_slots``: with ``n < num_slots`` every instance fills
  ``num_slots // n`` or one more slots and no slot is empty; with
  ``n >= num_slots`` both samplers pick ``num_slots`` distinct instances.
  With ``n = 0`` every slot is empty under both.

  Args:
    num_masks: int32 scalar tensor ``n``, the number of instances.
    num_slots: python int, the number of mask slots.
    sampler: one of ``MASK_SAMPLERS``.
    seed: int ``[2]`` stateless seed.

  Returns:
    int32 ``[num_slots]`` instance indices in ``[0, n]``; ``n`` marks an
    empty slot.
  """
  if sampler == 'pad_2020':
    order = tf.argsort(tf.random.stateless_uniform([num_masks], seed))
    pick = tf.concat([order, tf.fill([num_slots], num_masks)], 0)[:num_slots]
  else:
    total = tf.maximum(num_masks, num_slots)
    order = tf.argsort(tf.random.stateless_uniform([total], seed))
    # n = 0: every index modulo 1 is 0 = n, the empty slot.
    pick = tf.math.floormod(order[:num_slots], tf.maximum(num_masks, 1))
  return tf.ensure_shape(pick, [num_slots])


def _pad_or_clip(tensor, size, value):
  """Clips or pads the first dimension of ``tensor`` to ``size``."""
  tensor = tensor[:size]
  pad_shape = tf.concat([[size - tf.shape(tensor)[0]],
                         tf.shape(tensor)[1:]], 0)
  padded = tf.concat([tensor, tf.fill(pad_shape,
                                      tf.constant(value, tensor.dtype))], 0)
  return tf.ensure_shape(padded, [size] + tensor.shape.as_list()[1:])


def _source_id_to_int(source_id):
  """Decimal source id string -> int64; empty -> -1 (reference behaviour)."""
  is_number = tf.strings.regex_full_match(source_id, r'-?[0-9]+')
  is_empty = tf.equal(tf.strings.length(source_id), 0)
  check = tf.debugging.Assert(
      tf.logical_or(is_number, is_empty),
      ['image/source_id must be a decimal integer string for evaluation, '
       'got:', source_id])
  with tf.control_dependencies([check]):
    safe = tf.where(is_number, source_id, '-1')
    return tf.strings.to_number(safe, tf.int64)


@gin.configurable(module='official_shapemask')
class Parser:
  """Parses serialized ShapeMask tf.Examples into model inputs.

  Call ``parser(serialized, seed=None, source_file=None)``; ``seed`` is an
  optional int ``[2]`` tensor for the stateless random ops of training (the
  input reader passes one per element), ``source_file`` an optional
  tf.string scalar naming the record's file (the input reader passes it; it
  only appears in the class-id error). Without it, a parser built with ``seed=s`` derives
  the per-example seed from ``s`` and a hash of the record (reproducible);
  a parser built with ``seed=None`` draws one at random.

  Training returns ``(image [S, S, 3], labels)`` with ``labels``:
  ``cls_targets [A_total]`` int32, ``box_targets [A_total, 4]``,
  ``num_positives []``, ``image_info [4, 2]``, ``mask_boxes [N, 4]``,
  ``mask_outer_boxes [N, 4]``, ``mask_classes [N]`` int32,
  ``mask_targets [N, m, m]``, ``fine_mask_targets [N, m*u, m*u]``,
  ``mask_is_valid [N]`` (``N`` = ``num_sampled_masks``, ``m`` =
  ``mask_crop_size``, ``u`` = ``upsample_factor``).

  Eval returns ``(image, {'image_info', 'groundtruths'})`` where
  ``groundtruths`` holds ``source_id`` int64, ``height``/``width`` int32,
  ``num_detections`` int32 and, padded to ``max_num_instances``, ``boxes``
  (original-image pixels, -1 padding), ``classes`` int32 (-1), ``areas``
  (-1), ``is_crowds`` int32 (0) and ``masks_png`` tf.string ('').

  Args:
    output_size: int ``S`` (square canvas) or ``(S_h, S_w)``; must be a
      multiple of ``2**max_level``.
    min_level, max_level, num_scales, aspect_ratios, anchor_size: anchor
      settings (``official_shapemask.ops.anchors``).
    match_threshold, unmatched_threshold: anchor IoU thresholds.
    aug_rand_hflip: random horizontal flip (p = 0.5) in training.
    aug_scale_min, aug_scale_max: scale-jitter range in training.
    skip_crowd_during_training: drop crowd instances in training.
    max_num_instances: eval ground-truth padding size.
    num_sampled_masks: instance slots of the mask branch in training.
    mask_crop_size: coarse mask target side ``m``.
    upsample_factor: fine mask target side is ``m * upsample_factor``.
    outer_box_scale: outer box = box scaled about its centre.
    box_jitter_scale: std of the box jitter noise (0 disables).
    mask_train_class: 'all', 'voc' or 'nonvoc': only slots whose class is in
      that split are valid.
    mask_sampler: how the ``N`` mask slots are filled in training.
      ``'pad_2020'`` (the reference since April 2020): the instances in
      random order, clipped to ``N`` or padded with empty slots (class 0,
      zero box and targets). ``'seed_2019'`` (the parser behind the seed's
      benchmark numbers): instances repeat to fill all ``N`` slots, which
      are empty only when the image has no instance. In both, with
      ``mask_train_class='all'``, ``mask_is_valid`` is 1 for every slot of
      an image with at least one instance (so padded slots of
      ``'pad_2020'`` count as all-background targets) and 0 otherwise.
    use_bfloat16: cast the image to bfloat16.
    num_classes: the model's class slots (background 0 included); when
      given, a record with a category id outside ``[0, num_classes)`` fails
      with an ``InvalidArgumentError`` naming the id, the image and
      ``source_file`` (``class_ids.check_in_graph``). None: no check.
    mode: 'train' or 'eval'.
    seed: optional python int, see above.
  """

  def __init__(self,
               output_size,
               min_level=3,
               max_level=7,
               num_scales=3,
               aspect_ratios=(1.0, 2.0, 0.5),
               anchor_size=4.0,
               match_threshold=0.5,
               unmatched_threshold=0.5,
               aug_rand_hflip=True,
               aug_scale_min=0.8,
               aug_scale_max=1.2,
               skip_crowd_during_training=True,
               max_num_instances=100,
               num_sampled_masks=8,
               mask_crop_size=32,
               upsample_factor=4,
               outer_box_scale=1.25,
               box_jitter_scale=0.025,
               mask_train_class='all',
               mask_sampler='pad_2020',
               use_bfloat16=False,
               num_classes=None,
               mode='train',
               seed=None):
    if isinstance(output_size, int):
      output_size = (output_size, output_size)
    output_size = tuple(int(s) for s in output_size)
    stride = 2**max_level
    if len(output_size) != 2 or any(s <= 0 or s % stride for s in output_size):
      raise ValueError(
          f'output_size must be positive multiples of 2**max_level = {stride},'
          f' got {output_size}.')
    if mode not in _MODES:
      raise ValueError(f'mode must be one of {_MODES}, got {mode!r}.')
    if mask_train_class not in _MASK_TRAIN_CLASSES:
      raise ValueError(f'mask_train_class must be one of '
                       f'{_MASK_TRAIN_CLASSES}, got {mask_train_class!r}.')
    if mask_sampler not in MASK_SAMPLERS:
      raise ValueError(f'mask_sampler must be one of {MASK_SAMPLERS}, got '
                       f'{mask_sampler!r}.')
    if not 0.0 < aug_scale_min <= aug_scale_max:
      raise ValueError(f'need 0 < aug_scale_min <= aug_scale_max, got '
                       f'{aug_scale_min}, {aug_scale_max}.')
    if outer_box_scale < 1.0:
      raise ValueError(f'outer_box_scale must be >= 1, got {outer_box_scale}.')
    self._output_size = output_size
    self._mode = mode
    self._aug_rand_hflip = aug_rand_hflip
    self._aug_scale_min = float(aug_scale_min)
    self._aug_scale_max = float(aug_scale_max)
    self._skip_crowd = skip_crowd_during_training
    self._max_num_instances = max_num_instances
    self._num_sampled_masks = num_sampled_masks
    self._mask_crop_size = mask_crop_size
    self._upsample_factor = upsample_factor
    self._outer_box_scale = float(outer_box_scale)
    self._box_jitter_scale = float(box_jitter_scale)
    self._mask_train_class = mask_train_class
    self._mask_sampler = mask_sampler
    self._use_bfloat16 = use_bfloat16
    if num_classes is not None and int(num_classes) < 1:
      raise ValueError(f'num_classes must be >= 1, got {num_classes}.')
    self._num_classes = None if num_classes is None else int(num_classes)
    self._seed = seed
    self._decoder = tf_example_decoder.TfExampleDecoder()
    self._labeler = anchor_labeler.AnchorLabeler.from_config(
        output_size, min_level, max_level, num_scales, aspect_ratios,
        anchor_size, match_threshold, unmatched_threshold)

  @property
  def output_size(self):
    """``(S_h, S_w)`` of the padded canvas."""
    return self._output_size

  @property
  def mode(self):
    return self._mode

  @property
  def mask_sampler(self):
    """``'pad_2020'`` or ``'seed_2019'``, see the class docstring."""
    return self._mask_sampler

  @property
  def num_anchors(self):
    return self._labeler.num_anchors

  def __call__(self, serialized, seed=None, source_file=None):
    """Parses one serialized example; see the class docstring."""
    with tf.name_scope('shapemask_parser'):
      data = self._decoder.decode(serialized)
      if self._num_classes is not None:
        data['classes'] = class_ids.check_in_graph(
            data['classes'], self._num_classes, data['source_id'],
            source_file)
      if self._mode == 'train':
        return self._parse_train(data, self._resolve_seed(serialized, seed))
      return self._parse_eval(data)

  def _resolve_seed(self, serialized, seed):
    if seed is not None:
      return tf.reshape(tf.cast(seed, tf.int64), [2])
    if self._seed is not None:
      record_hash = tf.strings.to_hash_bucket_fast(serialized, _INT31_MAX)
      return tf.stack([tf.constant(self._seed, tf.int64), record_hash])
    return tf.random.uniform([2], 0, _INT31_MAX, dtype=tf.int64)

  def _finish_image(self, image):
    image = tf.ensure_shape(image, list(self._output_size) + [3])
    if self._use_bfloat16:
      image = tf.cast(image, tf.bfloat16)
    return image

  def _parse_train(self, data, seed):
    """Training parse, spec 7.2."""
    flip_seed, resize_seed, perm_seed, jitter_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 4))
    image = data['image']
    boxes = data['boxes']
    classes = data['classes']
    masks = data['masks']  # [n, H, W]
    # Indices into `masks` of the instances still kept.
    mask_index = tf.range(tf.shape(classes)[0])

    if self._skip_crowd:
      keep = tf.where(tf.logical_not(data['is_crowds']))[:, 0]
      boxes = tf.gather(boxes, keep)
      classes = tf.gather(classes, keep)
      mask_index = tf.gather(mask_index, keep)

    image_hw = tf.shape(image)[0:2]
    image = preprocess_ops.normalize_image(image)

    if self._aug_rand_hflip:
      do_flip = tf.random.stateless_uniform([], flip_seed) < 0.5
      image = tf.cond(do_flip,
                      lambda: preprocess_ops.horizontal_flip_image(image),
                      lambda: image)
      boxes = tf.cond(do_flip,
                      lambda: box_ops.horizontal_flip_boxes(boxes),
                      lambda: boxes)
      masks = tf.cond(do_flip,
                      lambda: preprocess_ops.horizontal_flip_masks(masks),
                      lambda: masks)

    boxes = box_ops.denormalize_boxes(boxes, image_hw)
    image, image_info = image_ops.resize_and_crop_image(
        image, self._output_size, self._aug_scale_min, self._aug_scale_max,
        resize_seed)
    image_scale = image_info[2]
    offset = image_info[3]
    boxes = boxes * tf.tile(image_scale, [2]) - tf.tile(offset, [2])
    boxes = _clip_boxes(boxes, self._output_size)

    non_empty = tf.where(
        tf.logical_and(boxes[:, 2] > boxes[:, 0], boxes[:, 3] > boxes[:, 1]))
    non_empty = non_empty[:, 0]
    boxes = tf.gather(boxes, non_empty)
    classes = tf.gather(classes, non_empty)
    mask_index = tf.gather(mask_index, non_empty)

    cls_targets, box_targets, num_positives = self._labeler.label_anchors(
        boxes, classes)

    # Mask sampling; slot index `n` is an all-zero dummy instance.
    num_slots = self._num_sampled_masks
    num_masks = tf.shape(classes)[0]
    pick = _sample_mask_slots(num_masks, num_slots, self._mask_sampler,
                              perm_seed)
    sampled_boxes = tf.gather(
        tf.concat([boxes, tf.zeros([1, 4], tf.float32)], 0), pick)
    sampled_classes = tf.gather(
        tf.concat([classes, tf.zeros([1], tf.int32)], 0), pick)
    num_decoded = tf.shape(masks)[0]
    sampled_mask_index = tf.gather(
        tf.concat([mask_index, [num_decoded]], 0), pick)

    sampled_boxes = _jitter_boxes(sampled_boxes, self._box_jitter_scale,
                                  jitter_seed)
    sampled_boxes = _clip_boxes(sampled_boxes, self._output_size)
    outer_boxes = _outer_boxes(sampled_boxes, self._outer_box_scale,
                               self._output_size)

    # Targets from the original-resolution masks: map the outer boxes back
    # with (box + offset) / scale and normalise by H, W (not H - 1, W - 1).
    mask_hw = tf.cast(tf.shape(masks)[1:3], tf.float32)
    boxes_orig = (outer_boxes + tf.tile(offset, [2])) / tf.tile(image_scale,
                                                                [2])
    boxes_norm = boxes_orig / tf.tile(mask_hw, [2])
    masks_ext = tf.concat(
        [masks, tf.zeros(tf.concat([[1], tf.shape(masks)[1:]], 0))], 0)
    masks_ext = masks_ext[..., None]

    def crop(side):
      crops = tf.image.crop_and_resize(
          masks_ext, boxes_norm, sampled_mask_index, [side, side],
          method='bilinear', extrapolation_value=0.0)
      return tf.cast(crops[..., 0] >= 0.5, tf.float32)

    mask_targets = crop(self._mask_crop_size)
    fine_mask_targets = crop(self._mask_crop_size * self._upsample_factor)

    valid = tf.cast(num_masks > 0, tf.float32) * tf.ones([num_slots])
    if self._mask_train_class != 'all':
      in_voc = tf.reduce_any(
          tf.equal(sampled_classes[:, None],
                   tf.constant(VOC_CLASS_IDS, tf.int32)[None, :]), axis=1)
      in_split = in_voc if self._mask_train_class == 'voc' else tf.logical_and(
          tf.logical_not(in_voc), sampled_classes > 0)
      valid = valid * tf.cast(in_split, tf.float32)

    labels = {
        'cls_targets': cls_targets,
        'box_targets': box_targets,
        'num_positives': num_positives,
        'image_info': image_info,
        'mask_boxes': sampled_boxes,
        'mask_outer_boxes': outer_boxes,
        'mask_classes': sampled_classes,
        'mask_targets': mask_targets,
        'fine_mask_targets': fine_mask_targets,
        'mask_is_valid': valid,
    }
    return self._finish_image(image), labels

  def _parse_eval(self, data):
    """Eval parse, spec 7.3, plus the PNG instance masks."""
    image_hw = tf.shape(data['image'])[0:2]
    image = preprocess_ops.normalize_image(data['image'])
    image, image_info = image_ops.resize_and_crop_image(
        image, self._output_size, 1.0, 1.0, seed=None)
    size = self._max_num_instances
    num_instances = tf.shape(data['classes'])[0]
    groundtruths = {
        'source_id': _source_id_to_int(data['source_id']),
        'height': data['height'],
        'width': data['width'],
        'num_detections': tf.minimum(num_instances, size),
        'boxes': _pad_or_clip(
            box_ops.denormalize_boxes(data['boxes'], image_hw), size, -1.0),
        'classes': _pad_or_clip(data['classes'], size, -1),
        'areas': _pad_or_clip(data['areas'], size, -1.0),
        'is_crowds': _pad_or_clip(tf.cast(data['is_crowds'], tf.int32), size,
                                  0),
        'masks_png': _pad_or_clip(data['masks_png'], size, ''),
    }
    labels = {'image_info': image_info, 'groundtruths': groundtruths}
    return self._finish_image(image), labels
