"""The JAX engine's loop and fine-tuning start (JAX subprocesses).

The engine's rounds return every step's losses and the controller stops at
a non-finite or exploding one naming the step (a stand-in step, no compile;
the one rule, `divergence.LossGuard`); a fine-tuning run starts from a Keras
backbone weights file through TensorFlow's readers (`init_weights_tf` in a
subprocess), and a file that cannot initialise the asked modules stops it
with one line naming the file.
"""
import textwrap

import pytest

_DIVERGING = textwrap.dedent("""
    import sys
    import numpy as np
    from official_shapemask.training import controller
    from official_shapemask.training import jax_step
    from official_shapemask.training import progress
    from official_shapemask.training import settings
    from official_shapemask.training import train_loop
    from official_shapemask.training.engines import jax_engine

    calls = []

    def fake_step(state, images, labels):
      calls.append(1)
      value = float(sys.argv[1]) if len(calls) == 3 else 1.0
      return state, {k: np.float32(value) for k in jax_step.LOSS_KEYS}

    class FakeManager:
      latest_checkpoint = "/run/checkpoints/0"

      def save(self, step, state):
        raise AssertionError("a diverged round was saved")

    run_settings = settings.Settings("/tmp/unused", steps_per_loop=4,
                                     checkpoint_every=4, total_steps=8,
                                     train_batch_size=2)
    engine = jax_engine.Engine(run_settings)
    engine.distribution = jax_step.data_parallel()
    engine.train_step, engine.manager, engine.state = (
        fake_step, FakeManager(), ())
    run = controller.Controller(run_settings, engine)
    batch = (np.zeros((2, 4, 4, 3), np.float32), {"x": np.zeros((2, 1))})
    run._iterator = iter([batch] * 8)
    run._logger = progress.ProgressLogger(8, 2, print_fn=print)
    try:
      run.train()
    except train_loop.DivergenceError as e:
      message = str(e)
    else:
      raise AssertionError("no error")
    assert message.startswith(sys.argv[2]), message
    assert ("the last good checkpoint is kept: /run/checkpoints/0"
            in message), message
    # The engine ran the whole round (its losses are read at its end);
    # the controller checked them and saved nothing.
    assert engine.step == 4 and len(calls) == 4
    print("OK")
""")


@pytest.mark.parametrize("value,start", [
    ("nan", "non-finite loss at step 3 (total_loss=nan"),
    ("1e6", "loss explosion at step 3: total loss 1e+06 exceeds 20"),
])
def test_diverging_loss_stops_naming_the_step(run_under_jax, value, start):
  result = run_under_jax(_DIVERGING, value, start, timeout=300)
  assert result.returncode == 0 and "OK" in result.stdout, (
      result.stdout[-3000:] + result.stderr[-5000:])


_INIT = textwrap.dedent("""
    import sys
    import keras
    import numpy as np
    from official_shapemask.modeling import factory
    from official_shapemask.weights import checkpoints
    from official_shapemask.training import gin_utils
    from official_shapemask.training import settings
    from official_shapemask.training.engines import jax_engine

    work = sys.argv[1]
    source = f"{work}/source_backbone.weights.h5"
    gin_utils.parse_config(["tiny_cpu.gin"], [
        "TRAIN_FILE_PATTERN='unused'", "IMAGE_SIZE=64",
        "build_shapemask_model.backbone_width_multiplier=0.25",
        "build_shapemask_model.fpn_num_filters=16",
        "build_shapemask_model.head_num_filters=16",
        f"RESNET_CHECKPOINT='{source}'"])
    keras.utils.set_random_seed(1)
    donor = factory.build_shapemask_model()
    checkpoints.save_backbone_weights(donor, source)
    keras.utils.set_random_seed(2)
    lines = []
    engine = jax_engine.Engine(settings.Settings(work), print_fn=lines.append)
    engine.start("train", {})
    model = engine.model
    before = [np.asarray(v.value) for v in model.decoder.weights]
    engine.initialize_from(source, "backbone")
    for a, b in zip(donor.backbone.weights, model.backbone.weights):
      np.testing.assert_array_equal(np.asarray(a.value), np.asarray(b.value))
    # The training state follows the loaded weights.
    for a, b in zip(model.trainable_variables, engine.state[0]):
      np.testing.assert_array_equal(np.asarray(a.value), np.asarray(b))
    # The decoder was not in the file: not the donor's values.
    assert not all(np.array_equal(np.asarray(a.value), np.asarray(b.value))
                   for a, b in zip(donor.decoder.weights,
                                   model.decoder.weights))
    assert len(before) == len(model.decoder.weights)
    report = "\\n".join(lines)
    assert f"Restored from {source} (modules=backbone)" in report, report
    try:
      engine.initialize_from(source, "all")
    except settings.InvalidInputError as e:
      message = str(e)
    else:
      raise AssertionError("modules=all from a backbone file did not fail")
    assert "\\n" not in message and source in message, message
    assert "'backbone' or 'backbone_fpn'" in message, message
    engine.close()
    print("OK")
""")


@pytest.mark.slow
def test_fine_tuning_starts_from_a_keras_backbone_file(tmp_path,
                                                       run_under_jax):
  result = run_under_jax(_INIT, str(tmp_path), timeout=1200)
  assert result.returncode == 0 and "OK" in result.stdout, (
      result.stdout[-3000:] + result.stderr[-5000:])
