"""Test oracle: the seed's TF1 ShapeMask parser and the Model Garden port's.

Runs in its own process (it sets ``TF_USE_LEGACY_KERAS=1`` before TensorFlow
is imported and switches TensorFlow to TF1 graph mode):

  python tests/reference/tf1_parser_oracle.py \
      --reference_dir=../shared/reference/tpu_detection \
      --records=examples.tfrecord --output=oracle.npz \
      --output_size=256 --num_sampled_masks=8,40

Two parsers read every serialized tf.Example of ``--records`` in training
mode with augmentation off (no flip, scale 1, box jitter 0):

- ``tf1``: ``dataloader/shapemask_parser.py`` of the reference code in
  ``--reference_dir`` (tensorflow/tpu; the shuffle-then-zero-pad sampler of
  April 2020 onwards);
- ``port``: ``official.legacy.detection.dataloader.shapemask_parser`` of
  tf-models-official (the seed-era sampler: a shuffled
  ``range(max(n, N))`` modulo ``n``).

The output ``.npz`` holds, for each parser and each slot count ``N`` (prefix
``{tf1,port}_n{N}/``), arrays stacked over the records:
``image_info [R, 4, 2]``, ``mask_boxes``/``mask_outer_boxes [R, N, 4]``,
``mask_classes``/``mask_is_valid [R, N]`` int32, and the bit-packed binary
targets ``mask_targets [R, N, m, m/8]``, ``fine_mask_targets [R, N, 4m,
4m/8]`` (``np.packbits`` along the last axis). The first (smallest) ``N``
also gives the anchor targets flattened in the project's anchor order
(level-major, row, column, anchor): ``cls_targets [R, A]`` int32,
``box_targets [R, A, 4]``, ``num_positives [R]``, and the normalised
``image [min(R, --num_images), S, S, 3]`` of the first records.
"""

import argparse
import os
import sys

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # pylint: disable=g-import-not-at-top


def _parser_kwargs(output_size, num_sampled_masks):
  """Reference architecture defaults with augmentation off."""
  return dict(
      output_size=[output_size, output_size], min_level=3, max_level=7,
      num_scales=3, aspect_ratios=[1.0, 2.0, 0.5], anchor_size=4.0,
      use_category=True, outer_box_scale=1.25, box_jitter_scale=0.0,
      num_sampled_masks=num_sampled_masks, mask_crop_size=32,
      upsample_factor=4, match_threshold=0.5, unmatched_threshold=0.5,
      aug_rand_hflip=False, aug_scale_min=1.0, aug_scale_max=1.0,
      skip_crowd_during_training=True, use_bfloat16=False,
      mask_train_class="all", mode="train")


def _flat_levels(tf, level_dict, depth):
  return tf.concat([tf.reshape(level_dict[level], [-1, depth])
                    for level in sorted(level_dict)], 0)


def _build(tf, parser, serialized, with_anchor_targets):
  """Fetch dict of one parser; the port returns ``(inputs, labels)``."""
  first, labels = parser(serialized)
  if isinstance(first, dict):  # The port: mask boxes and classes in inputs.
    labels = dict(labels, **first)
    image = first["image"]
  else:
    image = first
  fetches = {
      "image_info": labels["image_info"],
      "mask_boxes": labels["mask_boxes"],
      "mask_outer_boxes": labels["mask_outer_boxes"],
      "mask_classes": tf.cast(labels["mask_classes"], tf.int32),
      "mask_is_valid": tf.cast(labels["mask_is_valid"], tf.int32),
      "mask_targets": tf.cast(labels["mask_targets"], tf.uint8),
      "fine_mask_targets": tf.cast(labels["fine_mask_targets"], tf.uint8),
  }
  if with_anchor_targets:
    fetches.update(
        image=image,
        cls_targets=tf.cast(_flat_levels(tf, labels["cls_targets"], 1)[:, 0],
                            tf.int32),
        box_targets=_flat_levels(tf, labels["box_targets"], 4),
        num_positives=labels["num_positives"])
  return fetches


def run(reference_dir, records_path, output_size, slot_counts, num_images):
  """Parses every record with both parsers; returns the ``.npz`` dict."""
  reference_dir = os.path.abspath(reference_dir)
  detection_dir = os.path.join(reference_dir, "detection")
  if not os.path.isfile(os.path.join(detection_dir, "dataloader",
                                     "shapemask_parser.py")):
    raise SystemExit(f"--reference_dir={reference_dir!r} holds no "
                     "detection/dataloader/shapemask_parser.py")
  sys.path[:0] = [detection_dir, reference_dir]
  # pylint: disable=g-import-not-at-top
  import tensorflow.compat.v1 as tf
  tf.disable_v2_behavior()
  from dataloader import shapemask_parser as tf1_parser
  from official.legacy.detection.dataloader import (
      shapemask_parser as port_parser)
  # pylint: enable=g-import-not-at-top

  parsers = {}
  for name, module in (("tf1", tf1_parser), ("port", port_parser)):
    for slots in sorted(slot_counts):
      parsers[f"{name}_n{slots}"] = module.Parser(
          **_parser_kwargs(output_size, slots))
  smallest = f"_n{min(slot_counts)}"

  # Only the port needs autograph (its pad_to_size takes len() of a tensor,
  # which autograph turns into a graph op, as in the port's own tf.data
  # input); converting the TF1 parser too would only cost time.
  build_tf1 = tf.autograph.experimental.do_not_convert(_build)

  def parse_all(serialized):
    return {config: (build_tf1 if config.startswith("tf1") else _build)(
        tf, parser, serialized, config.endswith(smallest))
            for config, parser in parsers.items()}

  rows = {}
  with tf.Graph().as_default():
    tf.set_random_seed(0)
    dataset = tf.data.TFRecordDataset(records_path).map(parse_all)
    next_element = tf.data.make_one_shot_iterator(dataset).get_next()
    with tf.Session() as sess:
      index = 0
      while True:
        try:
          out = sess.run(next_element)
        except tf.errors.OutOfRangeError:
          break
        for config, values in out.items():
          for key, value in values.items():
            if key == "image" and index >= num_images:
              continue
            if key in ("mask_targets", "fine_mask_targets"):
              value = np.packbits(value, axis=-1)
            rows.setdefault(f"{config}/{key}", []).append(value)
        index += 1
  if not rows:
    raise SystemExit(f"--records={records_path!r} holds no record")
  return {key: np.stack(values) for key, values in rows.items()}


def main(argv=None):
  flags = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  flags.add_argument("--reference_dir", required=True,
                     help="the tensorflow/tpu copy (holds detection/)")
  flags.add_argument("--records", required=True,
                     help="one TFRecord file of serialized tf.Examples")
  flags.add_argument("--output", required=True, help=".npz to write")
  flags.add_argument("--output_size", type=int, default=256)
  flags.add_argument("--num_sampled_masks", default="8",
                     help="comma-separated slot counts N")
  flags.add_argument("--num_images", type=int, default=8,
                     help="records whose normalised image is kept")
  args = flags.parse_args(argv)
  slot_counts = [int(n) for n in args.num_sampled_masks.split(",")]
  arrays = run(args.reference_dir, args.records, args.output_size,
               slot_counts, args.num_images)
  tmp = args.output + ".tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, args.output)
  print(f"wrote {len(arrays)} arrays to {args.output}")


if __name__ == "__main__":
  main()
