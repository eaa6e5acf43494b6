"""tools/predict.py: overlays, COCO results JSON, image ids, errors.

The model is the planted tiny model of tests/serving/test_export.py (it
detects four boxes with masks above 0.5 on any image), exported with
`export_saved_model`; the CLI runs on two real coco_tiny160 val images.
"""

import io
import json
import os
import pathlib
import re
import shutil

import cv2
import numpy as np
from PIL import Image
from PIL import ImageOps
import pytest
import tensorflow as tf
from pycocotools import coco as coco_api
from pycocotools import mask as mask_api

from official_shapemask.cli import predict as predict_tool
from official_shapemask.evaluation import coco_utils
from official_shapemask.serving import exif_orientation
from official_shapemask.serving import export
from official_shapemask.serving import label_map as label_map_lib
from official_shapemask.serving import predictor as predictor_lib
from official_shapemask.serving import visualize
from tests.serving import test_export as helpers

IMAGE_IDS = (helpers.VAL_IMAGE_ID, helpers.PORTRAIT_IMAGE_ID)
TF_LOG_LINE = re.compile(r"^(?:\d{4}-\d\d-\d\d [\d:.]+: [EWF] |[EWF]\d{4} "
                         r"[\d:.]+ +\d+ \S+\] )", re.MULTILINE)
THRESHOLD = 0.5


def decode(path):
  return export.decode_image(tf.constant(pathlib.Path(path).read_bytes()))


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
  model = helpers.build_planted_model()
  export_dir = tmp_path_factory.mktemp("predict_export") / "saved_model"
  # Dynamic batch size (the CLI's --batch_size=0).
  export.export_saved_model(model, str(export_dir), batch_size=None)
  return str(export_dir)


@pytest.fixture(scope="module")
def images_dir(coco_tiny_root, tmp_path_factory):
  directory = tmp_path_factory.mktemp("images")
  for image_id in IMAGE_IDS:
    shutil.copy(helpers.val_image_path(coco_tiny_root, image_id), directory)
  return directory


@pytest.fixture(scope="module")
def cli_run(saved_model, images_dir, coco_tiny_root, tmp_path_factory):
  output_dir = tmp_path_factory.mktemp("predictions")
  annotations = coco_tiny_root / "annotations" / "instances_val2017.json"
  result = helpers.run_tool(
      "predict.py", f"--saved_model={saved_model}",
      f"--images={images_dir}/*.jpg", f"--output_dir={output_dir}",
      f"--score_threshold={THRESHOLD}", f"--label_map={annotations}")
  assert result.returncode == 0, result.stderr[-3000:]
  return {"output_dir": output_dir, "stdout": result.stdout,
          "stderr": result.stderr, "annotations": annotations}


@pytest.fixture(scope="module")
def expected(saved_model, images_dir):
  """The SavedModel's detections per image, pasted in this process."""
  predictor = predictor_lib.Predictor.from_saved_model(saved_model)
  assert predictor.batch_size is None
  images = [(images_dir / f"{i:012d}.jpg").read_bytes() for i in IMAGE_IDS]
  # Both images (different sizes) in one call of the dynamic-batch export.
  outputs = predictor.predict_bytes(images)
  return {image_id: predictor_lib.image_detections(outputs, i)
          for i, image_id in enumerate(IMAGE_IDS)}


def test_progress_and_files(cli_run):
  stdout = cli_run["stdout"]
  # Our progress only: none of TensorFlow's start-up ERROR/WARNING lines
  # (official_shapemask.quiet_logs).
  assert not TF_LOG_LINE.search(cli_run["stderr"]), cli_run["stderr"][-3000:]
  assert "image_id from file name stems" in stdout
  for i, image_id in enumerate(IMAGE_IDS[::-1]):  # Sorted by file name.
    assert f"[{i + 1}/2] " in stdout and f"{image_id:012d}.jpg" in stdout
  assert sorted(os.listdir(cli_run["output_dir"])) == sorted(
      [f"{i:012d}.png" for i in IMAGE_IDS] + ["coco_results.json",
                                              "image_ids.json"])


def test_overlay_size_and_changed_pixels(cli_run, images_dir, expected):
  labels = label_map_lib.load_label_map(str(cli_run["annotations"]))
  scales = []
  for image_id in IMAGE_IDS:
    original = decode(images_dir / f"{image_id:012d}.jpg").numpy()
    overlay = decode(cli_run["output_dir"] / f"{image_id:012d}.png").numpy()
    # Drawn enlarged by an integer factor until the short side is >= 480.
    scale = visualize.drawing_scale(*original.shape[:2])
    scales.append(scale)
    assert overlay.shape == (original.shape[0] * scale,
                             original.shape[1] * scale, 3)
    assert min(overlay.shape[:2]) >= 480
    base = visualize.enlarge(original, scale)
    detections = expected[image_id]
    drawn = detections["scores"] >= THRESHOLD
    assert drawn.sum() >= 1
    masks = detections["masks"][drawn].any(axis=0)
    assert masks.sum() > 1000
    masks = np.repeat(np.repeat(masks, scale, axis=0), scale, axis=1)
    changed = np.any(overlay != base, axis=-1)
    # Where masks were predicted, the colour is blended in.
    assert changed[masks].mean() > 0.95
    # Away from every drawn box, mask and label tag nothing changes (a tag
    # sits above, inside or below its box, from either edge).
    height, width = base.shape[:2]
    font_scale, thickness = visualize.text_style(height, width)
    # Mask outlines are a few pixels wide, centred on the mask's edge.
    near = cv2.dilate(masks.astype(np.uint8), np.ones((7, 7), np.uint8)) > 0
    for box, class_id, score in zip(detections["boxes"][drawn] * scale,
                                    detections["classes"][drawn],
                                    detections["scores"][drawn]):
      text = f"{label_map_lib.class_name(labels, class_id)}: {score:.2f}"
      (tag_w, tag_h), baseline = cv2.getTextSize(
          text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, thickness)
      tag_w, tag_h = tag_w + 8, tag_h + baseline + 8
      y0, x0, y1, x1 = (int(v) for v in box)
      near[max(y0 - tag_h, 0):min(y1 + tag_h, height),
           max(x0 - tag_w, 0):min(x1 + tag_w, width)] = True
    assert (~near).sum() > 0.1 * height * width
    assert not changed[~near].any()
  assert max(scales) > 1  # At least one image was drawn enlarged.


def test_results_json_loads_in_pycocotools(cli_run, expected):
  output_dir = cli_run["output_dir"]
  with open(output_dir / "coco_results.json") as f:
    results = json.load(f)
  coco_gt = coco_api.COCO(str(cli_run["annotations"]))
  coco_dt = coco_gt.loadRes(str(output_dir / "coco_results.json"))
  assert len(coco_dt.getAnnIds()) == len(results) == sum(
      len(d["scores"]) for d in expected.values())
  with open(output_dir / "image_ids.json") as f:
    ids = json.load(f)
  assert sorted(ids.values()) == sorted(IMAGE_IDS)
  for image_id in IMAGE_IDS:
    mine = [r for r in results if r["image_id"] == image_id]
    detections = expected[image_id]
    assert len(mine) == len(detections["scores"])
    height, width = detections["image_size"]
    info = coco_gt.imgs[image_id]
    assert (info["height"], info["width"]) == (height, width)
    np.testing.assert_allclose(
        [r["bbox"] for r in mine],
        coco_utils.yxyx_to_xywh(detections["boxes"]), rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose([r["score"] for r in mine],
                               detections["scores"], rtol=1e-6)
    assert [r["category_id"] for r in mine] == list(detections["classes"])
    for result, mask in zip(mine, detections["masks"]):
      assert result["segmentation"]["size"] == [height, width]
      np.testing.assert_array_equal(mask_api.decode(result["segmentation"]),
                                    mask)


def test_threshold_above_every_score_draws_nothing(saved_model, images_dir,
                                                   tmp_path):
  predictor = predictor_lib.Predictor.from_saved_model(saved_model)
  lines = []
  paths = [str(images_dir / f"{IMAGE_IDS[0]:012d}.jpg")]
  results = predict_tool.run(paths, predictor, str(tmp_path), 1.01, None,
                             print_fn=lines.append)
  assert len(results) == 4  # The JSON keeps every valid detection.
  assert "4 detections, 0 >= 1.01" in "\n".join(lines)
  overlay = decode(tmp_path / f"{IMAGE_IDS[0]:012d}.png").numpy()
  original = decode(paths[0]).numpy()
  np.testing.assert_array_equal(overlay, visualize.enlarge(
      original, visualize.drawing_scale(*original.shape[:2])))


def test_image_ids_from_positions_unless_all_stems_are_numbers():
  assert predict_tool.assign_image_ids(["a/12.jpg", "b/7.png"]) == (
      [12, 7], "file name stems")
  ids, rule = predict_tool.assign_image_ids(["x/12.jpg", "x/cat.jpg"])
  assert ids == [1, 2] and rule == "positions in the sorted file list"


def test_input_errors_name_the_file(tmp_path):
  with pytest.raises(predict_tool.PredictError, match="matched no files"):
    predict_tool.list_images(str(tmp_path / "*.jpg"))
  bad = tmp_path / "broken.jpg"
  bad.write_bytes(b"not an image at all")
  with pytest.raises(predict_tool.PredictError,
                     match=f"cannot decode image {bad}"):
    predict_tool.read_image(str(bad))
  with pytest.raises(predict_tool.PredictError, match="both be written"):
    predict_tool.output_names(["a/x.jpg", "b/x.png"])


def test_cli_exit_status_on_bad_input(tmp_path):
  result = helpers.run_tool("predict.py", "--saved_model=/nonexistent",
                            f"--images={tmp_path}/*.jpg",
                            f"--output_dir={tmp_path}/out")
  assert result.returncode == 1
  assert f"--images='{tmp_path}/*.jpg' matched no files" in result.stderr


def test_label_map_formats(tmp_path):
  as_dict = tmp_path / "a.json"
  as_dict.write_text(json.dumps({"1": "person", "18": "dog"}))
  as_coco = tmp_path / "b.json"
  as_coco.write_text(json.dumps({"categories": [{"id": 1, "name": "person"},
                                                {"id": 18, "name": "dog"}]}))
  for path in (as_dict, as_coco):
    names = label_map_lib.load_label_map(str(path))
    assert names == {1: "person", 18: "dog"}
    assert label_map_lib.class_name(names, 3) == "class 3"
  bad = tmp_path / "c.json"
  bad.write_text(json.dumps({"person": 1}))
  with pytest.raises(ValueError, match=str(bad)):
    label_map_lib.load_label_map(str(bad))


def test_draw_detections_blends_masks_and_skips_boxes_outside():
  image = np.full((120, 160, 3), 100, np.uint8)
  mask = np.zeros((1, 120, 160), np.uint8)
  mask[0, 60:90, 40:100] = 1
  drawn = visualize.draw_detections(image, [[40, 20, 100, 120]], [1], [0.9],
                                    mask, mask_alpha=0.5, min_short_side=0)
  color = np.array(visualize.class_color(1), np.float32)
  np.testing.assert_array_equal(
      drawn[75, 70], np.round(100 * 0.5 + color * 0.5).astype(np.uint8))
  assert (drawn[105:, 130:] == 100).all()
  assert (drawn[40, 20:121] == visualize.class_color(1)).all()  # Box edge.
  outside = visualize.draw_detections(image, [[130, 0, 150, 20]], [1], [0.9],
                                      min_short_side=0)
  np.testing.assert_array_equal(outside, image)


def test_extreme_aspect_ratio_images_run(saved_model, tmp_path):
  # A 3x2000 and a 2000x3 image at 128 px: the short side becomes 1 pixel.
  paths = []
  for height, width in ((3, 2000), (2000, 3)):
    path = tmp_path / f"strip_{height}x{width}.png"
    image = np.full((height, width, 3), 120, np.uint8)
    path.write_bytes(tf.io.encode_png(image).numpy())
    paths.append(str(path))
  predictor = predictor_lib.Predictor.from_saved_model(saved_model)
  out_dir = tmp_path / "out"
  results = predict_tool.run(paths, predictor, str(out_dir), THRESHOLD, None,
                             print_fn=lambda *a: None)
  for path, (height, width) in zip(paths, ((3, 2000), (2000, 3))):
    name = pathlib.Path(path).stem + ".png"
    assert decode(out_dir / name).numpy().shape == (height, width, 3)
  for result in results:
    x, y, w, h = result["bbox"]
    assert np.all(np.isfinite([x, y, w, h]))


# ----------------------------------------------------------------------------
# Bad output directories and damaged SavedModels: one line.


def test_output_dir_that_is_a_file_is_one_line(saved_model, images_dir,
                                               tmp_path):
  a_file = tmp_path / "predictions"
  a_file.write_text("not a directory")
  result = helpers.run_tool(
      "predict.py", f"--saved_model={saved_model}",
      f"--images={images_dir}/*.jpg", f"--output_dir={a_file}")
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      f"error: --output_dir={a_file} is a file; give a directory (created "
      "when missing).")
  assert "Traceback" not in result.stderr
  assert a_file.read_text() == "not a directory"
  # A file where a parent directory must be: named, nothing created.
  with pytest.raises(predict_tool.PredictError) as err:
    predict_tool.check_output_dir(str(a_file / "sub" / "dir"))
  assert str(err.value) == (
      f"--output_dir={a_file / 'sub' / 'dir'} cannot be created: {a_file} "
      "is a file; give a directory (created when missing).")
  predict_tool.check_output_dir(str(tmp_path / "new" / "dir"))
  assert not (tmp_path / "new").exists()


_DAMAGE = {
    "pb_truncated": ("saved_model.pb", "half",
                     "does not parse (DecodeError: Error parsing message "
                     "with type 'tensorflow.SavedModel': Wire format was "
                     "corrupt)"),
    "pb_empty": ("saved_model.pb", "empty",
                 "holds no MetaGraph (0 bytes: empty or cut short)"),
    "pb_missing": ("saved_model.pb", "delete", "is missing"),
    "data_truncated": ("variables/variables.data-00000-of-00001", "half",
                       "cannot be read (IndexError: Read less bytes than "
                       "requested)"),
    "data_overwritten": ("variables/variables.data-00000-of-00001", "flip",
                         "cannot be read (OpError: TensorBundle at "),
    "data_missing": ("variables/variables.data-00000-of-00001", "delete",
                     "is missing"),
    "index_truncated": ("variables/variables.index", "half",
                        "cannot be read (OpError: not an sstable (bad magic "
                        "number))"),
    "index_missing": ("variables/variables.index", "delete", "is missing"),
}


def _damaged_copy(saved_model, tmp_path, case):
  relative, how, why = _DAMAGE[case]
  copy = tmp_path / "saved_model"
  shutil.copytree(saved_model, copy)
  path = copy / relative
  raw = path.read_bytes()
  if how == "delete":
    path.unlink()
  elif how == "empty":
    path.write_bytes(b"")
  elif how == "half":
    path.write_bytes(raw[:len(raw) // 2])
  else:  # One byte overwritten in the middle.
    damaged = bytearray(raw)
    damaged[len(damaged) // 2] ^= 0xFF
    path.write_bytes(bytes(damaged))
  return copy, path, why


@pytest.mark.parametrize("case", sorted(_DAMAGE))
def test_damaged_saved_model_names_the_file(saved_model, tmp_path, case):
  copy, path, why = _damaged_copy(saved_model, tmp_path, case)
  with pytest.raises(predictor_lib.SavedModelError) as err:
    predictor_lib.Predictor.from_saved_model(str(copy))
  message = str(err.value)
  assert message.startswith(
      f"SavedModel {copy} cannot be loaded: {path} {why}"), message
  assert message.endswith("; export it again (tools/export_saved_model.py)")
  assert "\n" not in message


def test_cli_on_a_truncated_saved_model_is_one_line(saved_model, images_dir,
                                                    tmp_path):
  copy, path, why = _damaged_copy(saved_model, tmp_path, "data_truncated")
  out = tmp_path / "out"
  result = helpers.run_tool("predict.py", f"--saved_model={copy}",
                            f"--images={images_dir}/*.jpg",
                            f"--output_dir={out}")
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      f"error: SavedModel {copy} cannot be loaded: {path} {why}; export it "
      "again (tools/export_saved_model.py)")
  assert "Traceback" not in result.stderr
  assert not out.exists()


# ----------------------------------------------------------------------------
# EXIF orientation: drawn upright, results in the stored pixels.


def _with_exif(pixels, orientation, image_format="JPEG"):
  """Encoded bytes of `pixels` with an EXIF orientation tag (None: none)."""
  out = io.BytesIO()
  kwargs = {"quality": 95} if image_format == "JPEG" else {}
  if orientation is not None:
    exif = Image.Exif()
    exif[exif_orientation.ORIENTATION_TAG] = orientation
    kwargs["exif"] = exif
  Image.fromarray(pixels).save(out, format=image_format, **kwargs)
  return out.getvalue()


def _pillow_display(array, orientation):
  """`array` (uint8 [H, W] or [H, W, 3]) as Pillow turns it by its tag."""
  encoded = _with_exif(np.ascontiguousarray(array), orientation, "PNG")
  with Image.open(io.BytesIO(encoded)) as image:
    return np.asarray(ImageOps.exif_transpose(image))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_transforms_agree_with_pillow(orientation):
  rng = np.random.default_rng(orientation)
  image = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
  np.testing.assert_array_equal(
      exif_orientation.transform_array(image, orientation),
      _pillow_display(image, orientation))
  assert exif_orientation.read(_with_exif(image, orientation)) == orientation
  assert exif_orientation.read(_with_exif(image, orientation, "PNG")) == (
      orientation)
  # A box is the tight box of its pixels, turned by Pillow.
  box = np.array([[1, 2, 4, 6]], np.float32)  # ymin, xmin, ymax, xmax.
  mask = np.zeros((5, 7), np.uint8)
  mask[1:4, 2:6] = 255
  turned = _pillow_display(mask, orientation) > 0
  rows, cols = np.nonzero(turned)
  np.testing.assert_array_equal(
      exif_orientation.transform_boxes(box, orientation, 5, 7),
      [[rows.min(), cols.min(), rows.max() + 1, cols.max() + 1]])


def test_exif_read_without_a_tag():
  image = np.zeros((4, 6, 3), np.uint8)
  assert exif_orientation.read(_with_exif(image, None)) == 1
  assert exif_orientation.read(b"not an image") == 1
  assert exif_orientation.read(_with_exif(image, 9)) == 1  # Not a valid value.


@pytest.mark.parametrize("orientation", [6, 8, 3])
def test_phone_photo_drawn_upright_results_in_stored_pixels(
    saved_model, coco_tiny_root, tmp_path, orientation):
  """The same pixels with and without an EXIF orientation tag: identical
  results JSON (the stored-pixel frame), the overlay turned as viewers show
  the photo."""
  stored = decode(helpers.val_image_path(coco_tiny_root,
                                         helpers.VAL_IMAGE_ID)).numpy()
  height, width = stored.shape[:2]
  plain_dir, tagged_dir = tmp_path / "plain", tmp_path / "tagged"
  plain_dir.mkdir()
  tagged_dir.mkdir()
  (plain_dir / "photo.jpg").write_bytes(_with_exif(stored, None))
  (tagged_dir / "photo.jpg").write_bytes(_with_exif(stored, orientation))
  predictor = predictor_lib.Predictor.from_saved_model(saved_model)
  outputs, lines = {}, []
  for name, directory in (("plain", plain_dir), ("tagged", tagged_dir)):
    outputs[name] = predict_tool.run(
        [str(directory / "photo.jpg")], predictor, str(directory / "out"),
        THRESHOLD, None, print_fn=lines.append)
  assert outputs["tagged"] == outputs["plain"]  # Stored-pixel frame.
  assert f"(drawn upright: EXIF orientation {orientation}; results in the " \
         "stored pixels)" in "\n".join(lines)
  pixels = decode(plain_dir / "photo.jpg").numpy()
  detections = predictor_lib.image_detections(
      predictor.predict_bytes([(plain_dir / "photo.jpg").read_bytes()]), 0)
  masks = detections["masks"][detections["scores"] >= THRESHOLD].any(axis=0)
  assert masks.sum() > 1000
  # What viewers show, per Pillow: the turned photo and the turned masks.
  shown = _pillow_display(pixels, orientation)
  shown_masks = _pillow_display(masks.astype(np.uint8) * 255,
                                orientation) > 0
  overlay = decode(tagged_dir / "out" / "photo.png").numpy()
  scale = visualize.drawing_scale(height, width)
  expected_shape = (width, height) if orientation in (6, 8) else (height,
                                                                  width)
  assert overlay.shape == (expected_shape[0] * scale,
                           expected_shape[1] * scale, 3)
  changed = np.any(overlay != visualize.enlarge(shown, scale), axis=-1)
  shown_masks = np.repeat(np.repeat(shown_masks, scale, 0), scale, 1)
  assert changed[shown_masks].mean() > 0.95
  # Far from every turned mask (and its box and tag) the photo is unchanged.
  assert changed[~shown_masks].mean() < 0.5
