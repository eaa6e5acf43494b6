"""What an evaluation leaves behind, for both training engines.

`publish` prints the COCO table and, on the chief, writes
`model_dir/eval_<step>.json` (atomically) and the `eval/<metric>` TensorBoard
scalars under `model_dir/eval`.
"""

import json
import math
import os
import uuid

import tensorflow as tf

from official_shapemask.evaluation import coco_evaluator


def write_json_atomic(path, data):
  """Writes a flat dict as JSON (NaN/inf as null) via a temporary file."""
  clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
           for k, v in data.items()}
  tmp = f"{path}.{uuid.uuid4().hex}.tmp"
  with tf.io.gfile.GFile(tmp, "w") as f:
    json.dump(clean, f, indent=1, sort_keys=True)
  tf.io.gfile.rename(tmp, path, overwrite=True)


def publish(model_dir, metrics, chief=True, print_fn=print):
  """Prints the table; the chief writes the JSON file and the scalars.

  Args:
    model_dir: the run's model directory.
    metrics: `COCOEvaluator.evaluate`'s dict plus `step`, `num_images` and
      `predict_seconds`.
    chief: whether this process writes files.
    print_fn: where the table goes.

  Returns:
    `metrics`.
  """
  step = metrics["step"]
  print_fn(f"Evaluation at step {step} ({metrics['num_images']} images, "
           f"predict {metrics['predict_seconds']:.1f} s, COCOeval "
           f"{metrics.get('eval_seconds', 0.0):.1f} s):\n"
           + coco_evaluator.format_metrics_table(metrics))
  if chief:
    write_json_atomic(os.path.join(model_dir, f"eval_{step}.json"), metrics)
    writer = tf.summary.create_file_writer(os.path.join(model_dir, "eval"))
    with writer.as_default(step=step):
      for k, v in metrics.items():
        if isinstance(v, (int, float)) and k != "step":
          tf.summary.scalar(f"eval/{k}", v)
    writer.flush()
  return metrics
