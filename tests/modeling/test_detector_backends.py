"""The detector half (ResNet + FPN + RetinaNet head + detection generator)
traces under XLA (``jit_compile=True``) and runs under KERAS_BACKEND=jax with
the same numbers as the TensorFlow backend."""
import textwrap

import keras
import numpy as np
import pytest

from tests.modeling.tiny_detector import build_detector

SIZE, NUM_CLASSES = 128, 7


def _inputs():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(2, SIZE, SIZE, 3)).astype(np.float32)
  # Head-like outputs with well separated scores for the generator check.
  total = 3024  # anchors at 128 px, levels 3-5
  cls = rng.normal(-3.0, 1.5, (2, total, NUM_CLASSES)).astype(np.float32)
  box = rng.normal(0.0, 0.3, (2, total, 4)).astype(np.float32)
  return images, cls, box


def test_forward_traces_under_xla():
  tf = pytest.importorskip("tensorflow")
  if keras.backend.backend() != "tensorflow":
    pytest.skip("XLA check runs with the TensorFlow backend")
  model, _, generator = build_detector(SIZE, NUM_CLASSES)
  images, cls, box = _inputs()
  eager = model(images, training=False)
  compiled = tf.function(lambda x: model(x, training=False),
                         jit_compile=True)
  xla = compiled(tf.constant(images))
  for key in ("cls_outputs", "box_outputs"):
    np.testing.assert_allclose(xla[key].numpy(), np.asarray(eager[key]),
                               rtol=1e-4, atol=1e-4)
  assert xla["detection_boxes"].shape == (2, 20, 4)
  assert xla["num_detections"].dtype == tf.int32
  # The generator alone under XLA gives the eager detections exactly.
  det_eager = generator(cls, box)
  det_xla = tf.function(generator, jit_compile=True)(tf.constant(cls),
                                                    tf.constant(box))
  for key, value in det_eager.items():
    np.testing.assert_allclose(det_xla[key].numpy(), np.asarray(value),
                               rtol=1e-5, atol=1e-4)
  assert int(np.asarray(det_eager["num_detections"]).min()) == 20


_JAX_SCRIPT = textwrap.dedent("""
    import sys
    import keras
    import numpy as np
    from tiny_detector import build_detector
    assert keras.backend.backend() == "jax", keras.backend.backend()
    data = np.load(sys.argv[1])
    model, layers, generator = build_detector(128, 7)
    for i, layer in enumerate(layers):
      layer.set_weights([data[f"w{i}_{j}"] for j in range(len(layer.weights))])
    out = model.predict_on_batch(data["images"])
    det = generator(data["cls"], data["box"])
    np.savez(sys.argv[2], cls_outputs=np.asarray(out["cls_outputs"]),
             box_outputs=np.asarray(out["box_outputs"]),
             model_boxes=np.asarray(out["detection_boxes"]),
             **{k: np.asarray(v) for k, v in det.items()})
    # The model code never needs TensorFlow under another backend.
    assert "tensorflow" not in sys.modules, "TensorFlow was imported"
""")


def test_same_numbers_under_jax_backend(tmp_path, run_under_jax):
  pytest.importorskip("jax")
  model, layers, generator = build_detector(SIZE, NUM_CLASSES)
  images, cls, box = _inputs()
  expected = model(images, training=False)
  expected_det = generator(cls, box)
  arrays = {"images": images, "cls": cls, "box": box}
  for i, layer in enumerate(layers):
    for j, w in enumerate(layer.get_weights()):
      arrays[f"w{i}_{j}"] = w
  np.savez(tmp_path / "in.npz", **arrays)
  proc = run_under_jax(_JAX_SCRIPT, str(tmp_path / "in.npz"),
                       str(tmp_path / "out.npz"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = np.load(tmp_path / "out.npz")
  for key in ("cls_outputs", "box_outputs"):
    np.testing.assert_allclose(got[key], np.asarray(expected[key]),
                               rtol=1e-4, atol=1e-4)
  assert got["model_boxes"].shape == (2, 20, 4)
  for key, value in expected_det.items():
    np.testing.assert_allclose(got[key], np.asarray(value), rtol=1e-5,
                               atol=1e-4)
  assert got["detection_classes"].dtype == np.int32
