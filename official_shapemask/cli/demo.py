r"""The `make demo` job: ShapeMask end to end on a fresh clone, on a CPU.

Steps, each with the project's own command-line tools:

1. make a synthetic COCO-format dataset (tools/make_synthetic_coco.py);
2. convert it to TFRecords (tools/create_coco_tfrecord.py);
3. compute class shape priors by k-means (tools/generate_shape_priors.py);
4. train a small ShapeMask and evaluate it (train.py, gin/demo.gin);
5. export a SavedModel (tools/export_saved_model.py);
6. run it on a few val images and draw the masks (tools/predict.py), and
   tile the drawings into one picture (contact_sheet.png).

Everything goes under --output_dir; the last line reads
`mask_AP=<value> box_AP=<value> minutes=<value>`. A second run replaces
the first one's outputs (its run/ is trained afresh unless --nofresh), so
the demo writes only into a new or empty directory or one it wrote before
(marked by its `.shapemask_demo` file); any other directory is refused.

  python tools/demo.py --output_dir=demo_out
"""

import glob
import json
import os
import shutil
import subprocess
import sys
import time

from absl import flags

from official_shapemask import quiet_logs
from official_shapemask.cli import entry

_OUTPUT_DIR = flags.DEFINE_string("output_dir", "demo_out",
                                  "where the data, run and pictures go")
_NUM_TRAIN = flags.DEFINE_integer("num_train", 400, "synthetic train images")
_NUM_VAL = flags.DEFINE_integer("num_val", 50, "synthetic val images")
_STEPS = flags.DEFINE_integer("steps", None,
                              "training steps (default: gin/demo.gin's)")
_NUM_PREDICT = flags.DEFINE_integer("num_predict", 6,
                                    "val images drawn with their masks")
_FRESH = flags.DEFINE_bool(
    "fresh", True, "start training from scratch (False resumes the run in "
    "output_dir/run)")


MARKER = ".shapemask_demo"
# Side of the shape priors: gin/demo.gin's build_shapemask_model.
# mask_crop_size (the model refuses priors of another size).
PRIOR_SIZE = 16


def check_output_dir(out, records):
  """Stops the demo unless `out` is new, empty or an earlier demo's.

  An earlier demo's directory carries MARKER, or (written before the
  marker existed) a `run/config.gin` trained on its own `records`.
  """
  if not os.path.exists(out):
    return
  if not os.path.isdir(out):
    raise SystemExit(f"demo: --output_dir {out} is a file; give a new or "
                     "empty directory")
  names = sorted(os.listdir(out))
  if not names or MARKER in names:
    return
  config = os.path.join(out, "run", "config.gin")
  if os.path.isfile(config):
    with open(config) as f:
      if f"TRAIN_FILE_PATTERN = '{records}/train-*'" in f.read():
        return
  shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more"
                                  if len(names) > 4 else "")
  raise SystemExit(
      f"demo: --output_dir {out} holds files the demo did not write "
      f"({shown}; no {MARKER}), and the demo replaces its run/ and "
      "predict_inputs/ there: give a new or empty directory")


def _run(title, args):
  """Runs one tool, streaming its output; stops the demo if it fails.

  `args[0]` names the program (`official_shapemask.cli.<name>`, what
  `tools/<name>.py` and `train.py` run), the rest are its flags.
  """
  args = ["-m", f"official_shapemask.cli.{args[0]}"] + list(args[1:])
  print(f"\n=== {title}\n$ python {' '.join(args)}", flush=True)
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  start = time.time()
  proc = subprocess.run([sys.executable] + args, env=env, check=False)
  if proc.returncode:
    raise SystemExit(f"demo: step '{title}' failed (exit {proc.returncode})")
  print(f"=== {title}: {time.time() - start:.1f} s", flush=True)


def write_contact_sheet(paths, sheet_path, columns=3):
  """Tiles the overlay PNGs `paths` into one PNG at `sheet_path`."""
  # pylint: disable=g-import-not-at-top
  import cv2
  from official_shapemask.serving import visualize
  images = []
  for path in paths:
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
      raise SystemExit(f"demo: cannot read the overlay {path}")
    images.append(image[:, :, ::-1])
  sheet = visualize.contact_sheet(
      images, columns=columns, titles=[os.path.basename(p) for p in paths])
  tmp_path = sheet_path + ".tmp.png"
  if not cv2.imwrite(tmp_path, sheet[:, :, ::-1]):
    raise SystemExit(f"demo: cannot write {tmp_path}")
  os.replace(tmp_path, sheet_path)
  return sheet_path


def main(argv):
  del argv
  start = time.time()
  out = os.path.abspath(_OUTPUT_DIR.value)
  data, run_dir = os.path.join(out, "data"), os.path.join(out, "run")
  records, pictures = os.path.join(data, "records"), os.path.join(
      out, "predictions")
  check_output_dir(out, records)
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, MARKER), "w") as f:
    f.write("written by tools/demo.py: a later demo may replace what is "
            "here\n")
  if _FRESH.value and os.path.isdir(run_dir):
    shutil.rmtree(run_dir)  # The demo's own run (checked above).

  _run("1/6 synthetic COCO dataset", [
      "make_synthetic_coco", f"--output_dir={data}",
      f"--num_train={_NUM_TRAIN.value}", f"--num_val={_NUM_VAL.value}",
      "--image_size=160", "--seed=0"
  ])
  for split in ("train", "val"):
    _run(f"2/6 TFRecords ({split})", [
        "create_coco_tfrecord", f"--image_dir={data}/{split}",
        f"--object_annotations_file={data}/annotations/instances_{split}.json",
        f"--output_file_prefix={records}/{split}", "--num_shards=4"
    ])
  priors = os.path.join(data, "shape_priors.npy")
  _run("3/6 shape priors", [
      "generate_shape_priors",
      f"--annotation_file={data}/annotations/instances_train.json",
      f"--output={priors}", "--num_clusters=8",
      f"--prior_size={PRIOR_SIZE}"
  ])
  bindings = [
      f"--gin_bindings=TRAIN_FILE_PATTERN='{records}/train-*'",
      f"--gin_bindings=EVAL_FILE_PATTERN='{records}/val-*'",
      f"--gin_bindings=VAL_JSON_FILE='{data}/annotations/instances_val.json'",
      f"--gin_bindings=SHAPE_PRIOR_PATH='{priors}'",
  ]
  if _STEPS.value:
    bindings.append(f"--gin_bindings=TOTAL_STEPS={_STEPS.value}")
  _run("4/6 train and evaluate", ["train", "--gin_file=demo.gin"] +
       bindings + [f"--model_dir={run_dir}", "--mode=train_and_eval"])

  evals = sorted(glob.glob(os.path.join(run_dir, "eval_*.json")),
                 key=lambda p: int(p.rsplit("_", 1)[1].split(".")[0]))
  if not evals:
    raise SystemExit(f"demo: no evaluation results in {run_dir}")
  with open(evals[-1]) as f:
    metrics = json.load(f)

  export_dir = os.path.join(out, "saved_model")
  _run("5/6 SavedModel export", [
      "export_saved_model", "--gin_file=demo.gin"
  ] + bindings + [f"--checkpoint={run_dir}", f"--export_dir={export_dir}",
                  "--overwrite"])  # The demo's own output: rebuilt each run.
  val_images = sorted(glob.glob(os.path.join(data, "val", "*.png")))
  sample = os.path.join(out, "predict_inputs")
  if os.path.isdir(sample):  # The demo's own folder: a previous run's inputs.
    shutil.rmtree(sample)
  os.makedirs(sample)
  for path in val_images[:_NUM_PREDICT.value]:
    shutil.copy(path, sample)
  _run("6/6 predictions with overlays", [
      "predict", f"--saved_model={export_dir}",
      f"--images={sample}/*.png", f"--output_dir={pictures}",
      f"--label_map={records}/train_label_map.json"
  ])

  sheet = write_contact_sheet(
      [os.path.join(pictures, os.path.splitext(os.path.basename(p))[0] +
                    ".png") for p in val_images[:_NUM_PREDICT.value]],
      os.path.join(out, "contact_sheet.png"))

  minutes = (time.time() - start) / 60
  print(f"\nDemo outputs under {out}:\n"
        f"  data and TFRecords   {data}\n"
        f"  shape priors         {priors} (+ .png grid)\n"
        f"  checkpoints, logs    {run_dir} (TensorBoard: tensorboard "
        f"--logdir {run_dir})\n"
        f"  COCO metrics         {evals[-1]}\n"
        f"  SavedModel           {export_dir}\n"
        f"  overlays             {pictures}\n"
        f"  contact sheet        {sheet}")
  print(f"mask_AP={metrics['mask_AP']:.3f} box_AP={metrics['AP']:.3f} "
        f"minutes={minutes:.1f}")


def console_entry():
  """Entry point of the console script and of the tools/ launcher."""
  # One stderr filter for every step (the tools see it and add none).
  quiet_logs.install()
  entry.run(main, __name__)


if __name__ == "__main__":
  console_entry()
