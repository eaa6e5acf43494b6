"""Switching engines on one model_dir (issue 18): one model, two formats.

One module fixture on coco_tiny160 (tiny_cpu.gin made smaller, as in
test_train_cli_jax.py, with a deterministic input order), four commands on
one --model_dir:

1. `train.py` (TensorFlow loop) to step 4: `ckpt-2`, `ckpt-4`;
2. `KERAS_BACKEND=jax train.py` to step 6: resumes from `ckpt-4`, saves the
   Orbax step `checkpoints/6` and `shapemask-6.weights.h5`; the directory
   is copied here (`at6`, and `at6_orbax` without the weights file);
3. `train.py` (TensorFlow) to step 8: resumes from the Orbax step 6;
4. `KERAS_BACKEND=jax train.py --mode=eval`: evaluates `ckpt-8`.

and two same-engine resumes from copies, the runs a switched resume must
continue as: TensorFlow from `ckpt-4` to 6 and JAX from `checkpoints/6`
to 8 (a resume restarts the input pipeline, so these, not an uninterrupted
run, see the same batches).

The tests read their output lines and files, compare the state each engine
resumed with the state the other engine saved (exactly, every variable and
optimizer slot), compare the switched runs' losses and next states with the
same-engine resumes' (to the two engines' rounding), and run the readers
(export, predict, `--mode=eval` under TensorFlow) and a refused switch in
this process.
"""
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap

import gin
import keras
import numpy as np
import pytest
import tensorflow as tf

from official_shapemask.training import train_loop
from tests.training import test_train_cli_jax as cli_jax

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
TIMEOUT = 1500
# test_train_cli_jax.py's smaller model, evaluated on 4 images.
SMALL = [b for b in cli_jax.SMALL if "eval_samples" not in b] + [
    "EVAL_SAMPLES=4"]
LINE = re.compile(
    r"^step (\d+)/(\d+) " +
    " ".join(rf"{k}=(-?[\d.]+(?:e[+-]?\d+)?)" for k in train_loop.LOSS_KEYS) +
    r" lr=([\d.e+-]+) ")


def expected_lr(step):
  """Warmup from 0.002 to 0.02 over 10 steps (every step here is in it)."""
  return 0.002 + step / 10 * (0.02 - 0.002)


def _progress(text):
  """`[(step, total, lr)]` of the progress lines."""
  found = []
  for line in text.splitlines():
    m = LINE.match(line)
    if m:
      found.append((int(m.group(1)), int(m.group(2)),
                    float(m.group(len(train_loop.LOSS_KEYS) + 3))))
  return found


def _command(backend, total, model_dir, records, mode="train"):
  train, val = records
  bindings = [f"TRAIN_FILE_PATTERN='{train}'", f"EVAL_FILE_PATTERN='{val}'",
              f"TOTAL_STEPS={total}", "STEPS_PER_LOOP=2",
              "CHECKPOINT_EVERY=2", "WARMUP_STEPS=10", "WARMUP_LR=0.002",
              "INIT_LR=0.02", "Experiment.deterministic_input=True"] + SMALL
  cmd = [sys.executable, str(REPO_ROOT / "train.py"),
         "--gin_file=tiny_cpu.gin",
         *[f"--gin_bindings={b}" for b in bindings],
         f"--model_dir={model_dir}", f"--mode={mode}"]
  env = dict(os.environ, KERAS_BACKEND=backend, JAX_PLATFORMS="cpu",
             TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1",
             CUDA_VISIBLE_DEVICES="")
  result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT, check=False)
  assert result.returncode == 0, (
      f"{backend} {mode} to {total}:\n{result.stdout[-3000:]}"
      f"{result.stderr[-5000:]}")
  return result.stdout


@pytest.fixture(scope="module")
def switched(tiny_train_records, tiny_val_records, tmp_path_factory):
  pytest.importorskip("jax")
  pytest.importorskip("orbax.checkpoint")
  root = tmp_path_factory.mktemp("switch")
  model_dir = root / "run"
  records = (tiny_train_records, tiny_val_records)
  out = {"model_dir": model_dir}
  out["tf_to_4"] = _command("tensorflow", 4, model_dir, records)
  out["tf_resumed"] = root / "tf_resumed"  # TensorFlow on from ckpt-4.
  shutil.copytree(model_dir, out["tf_resumed"])
  out["tf_resumed_to_6"] = _command("tensorflow", 6, out["tf_resumed"],
                                    records)
  out["jax_to_6"] = _command("jax", 6, model_dir, records)
  out["jax_resumed"] = root / "jax_resumed"  # JAX on from checkpoints/6.
  shutil.copytree(model_dir, out["jax_resumed"])
  out["jax_resumed_to_8"] = _command("jax", 8, out["jax_resumed"], records)
  out["at6"] = root / "at6"
  shutil.copytree(model_dir, out["at6"])
  out["at6_orbax"] = root / "at6_orbax"  # As before the weights file.
  shutil.copytree(model_dir, out["at6_orbax"])
  (out["at6_orbax"] / "shapemask-6.weights.h5").unlink()
  out["tf_to_8"] = _command("tensorflow", 8, model_dir, records)
  out["jax_eval"] = _command("jax", 8, model_dir, records, mode="eval")
  return out


def _orbax_steps(model_dir):
  return sorted(int(p.name) for p in (model_dir / "checkpoints").iterdir()
                if p.name.isdigit())


@pytest.mark.slow
def test_jax_engine_resumes_the_tensorflow_run(switched):
  at6 = switched["at6"]
  assert _progress(switched["tf_to_4"]) == [
      (2, 4, pytest.approx(expected_lr(2), rel=1e-3)),
      (4, 4, pytest.approx(expected_lr(4), rel=1e-3))]
  out = switched["jax_to_6"]
  run = switched["model_dir"]
  assert (f"Resuming step 4 from the TensorFlow engine's checkpoint "
          f"{run}/ckpt-4") in out.splitlines()
  assert "Resumed from" not in out
  # The step and the learning rate continue: step 6 of the same warmup.
  assert _progress(out) == [(6, 6, pytest.approx(expected_lr(6), rel=1e-3))]
  assert (f"{run}/config.gin now holds this run's config; the earlier one is "
          f"kept as {run}/config-4.gin") in out
  # The next save is this engine's; the other's checkpoints stay.
  assert _orbax_steps(at6) == [6]
  assert (at6 / "shapemask-6.weights.h5").is_file()
  assert tf.train.get_checkpoint_state(str(at6)).all_model_checkpoint_paths[
      -1].endswith("ckpt-4")


@pytest.mark.slow
def test_tensorflow_loop_resumes_the_jax_run(switched):
  run = switched["model_dir"]
  out = switched["tf_to_8"]
  assert (f"Resuming step 6 from the JAX engine's checkpoint "
          f"{run}/checkpoints/6") in out.splitlines()
  assert "Resumed from" not in out
  assert _progress(out) == [(8, 8, pytest.approx(expected_lr(8), rel=1e-3))]
  assert tf.train.latest_checkpoint(str(run)) == str(run / "ckpt-8")
  assert _orbax_steps(run) == [6]


_JAX_SIDE = textwrap.dedent("""
    import sys
    import numpy as np
    from official_shapemask.training import engine_models
    from official_shapemask.training import engine_switch
    from official_shapemask.training import jax_step
    from official_shapemask.weights import any_engine
    from official_shapemask.weights import jax_checkpoints

    run, jax_resumed, out = sys.argv[1:]
    model, optimizer = engine_models.build_model_and_optimizer(
        run + "/config.gin")
    arrays = {}

    def dump(prefix, groups):
      for g, group in enumerate(groups):
        for i, value in enumerate(group):
          arrays[f"{prefix}/{g}/{i}"] = np.asarray(value)

    # What the JAX engine resumed from (engine_switch.resume's load).
    ref = any_engine.StepRef(4, "tensorflow", run + "/ckpt-4",
                             "tf_checkpoint")
    assert engine_switch.load(ref, model, optimizer) == 4
    dump("switched", [[v.value for v in group] for group in (
        model.trainable_variables, model.non_trainable_variables,
        optimizer.variables)])
    # What the JAX engine itself saved: its step 6 after the switch, and
    # step 8 of its own resume from there.
    for prefix, directory, step in (("orbax", run, 6),
                                    ("orbax8", jax_resumed, 8)):
      manager = jax_checkpoints.CheckpointManager(
          directory, jax_step.TrainStep(model, optimizer), read_only=True)
      state, _ = manager.restore(step)
      manager.close()
      dump(prefix, state)
    np.savez(out, **arrays)
    print("OK")
""")


@pytest.fixture(scope="module")
def jax_side(switched, tmp_path_factory):
  """`{prefix/group/index: array}` of the JAX side (see `_JAX_SIDE`); groups
  0, 1, 2: trainable, non-trainable, optimizer variables, in the order of
  the model and optimizer `_build` makes."""
  dump = tmp_path_factory.mktemp("jax_side") / "state.npz"
  env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu",
             TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(REPO_ROOT))
  result = subprocess.run(
      [sys.executable, "-c", _JAX_SIDE, str(switched["model_dir"]),
       str(switched["jax_resumed"]), str(dump)],
      env=env, capture_output=True, text=True, timeout=TIMEOUT,
      cwd=str(REPO_ROOT), check=False)
  assert result.returncode == 0 and "OK" in result.stdout, (
      result.stdout[-3000:] + result.stderr[-5000:])
  return dict(np.load(dump))


def _build(config):
  """The engines' model and optimizer under TensorFlow, from a config."""
  from official_shapemask.training import engine_models  # pylint: disable=g-import-not-at-top
  keras.mixed_precision.set_global_policy("float32")
  try:
    return engine_models.build_model_and_optimizer(str(config))
  finally:
    gin.clear_config()


def _groups(model, optimizer):
  return (model.trainable_variables, model.non_trainable_variables,
          optimizer.variables)


def _tf_state(config, prefix):
  """`{variable path: array}` and `{group/index: array}` of the TensorFlow
  loop's own restore of the checkpoint `prefix`."""
  from official_shapemask.weights import checkpoints  # pylint: disable=g-import-not-at-top
  model, optimizer = _build(config)
  checkpoints.restore_checkpoint(
      tf.train.Checkpoint(model=model, optimizer=optimizer), str(prefix))
  by_key = {f"{g}/{i}": v.numpy()
            for g, group in enumerate(_groups(model, optimizer))
            for i, v in enumerate(group)}
  names = {f"{g}/{i}": v.path
           for g, group in enumerate(_groups(model, optimizer))
           for i, v in enumerate(group)}
  return by_key, names


def _assert_state_equal(model, optimizer, arrays, prefix):
  for g, group in enumerate(_groups(model, optimizer)):
    assert f"{prefix}/{g}/{len(group)}" not in arrays
    for i, variable in enumerate(group):
      expected = arrays[f"{prefix}/{g}/{i}"]
      np.testing.assert_array_equal(
          variable.numpy(), expected.astype(variable.dtype),
          err_msg=f"{prefix}: {variable.path}")
  slots = [v.numpy() for v in optimizer.variables if "momentum" in v.path]
  assert slots and sum(bool(np.any(s)) for s in slots) > 0.8 * len(slots)


@pytest.mark.slow
def test_the_state_after_a_switch_is_the_state_saved(switched, jax_side):
  """Weights, batch-norm statistics, optimizer step and momentum slots, in
  both directions, bit for bit."""
  from official_shapemask.training import engine_switch  # pylint: disable=g-import-not-at-top
  from official_shapemask.weights import any_engine  # pylint: disable=g-import-not-at-top
  from official_shapemask.weights import checkpoints  # pylint: disable=g-import-not-at-top
  run = switched["model_dir"]
  # TensorFlow -> JAX: the TensorFlow loop's own restore of ckpt-4.
  model, optimizer = _build(run / "config.gin")
  checkpoints.restore_checkpoint(
      tf.train.Checkpoint(model=model, optimizer=optimizer),
      str(run / "ckpt-4"))
  assert int(optimizer.iterations.numpy()) == 4
  _assert_state_equal(model, optimizer, jax_side, "switched")
  # JAX -> TensorFlow: what the TensorFlow loop resumed from.
  model, optimizer = _build(run / "config.gin")
  ref = any_engine.StepRef(6, "jax", str(run / "checkpoints" / "6"), "orbax")
  assert engine_switch.load(ref, model, optimizer) == 6
  assert int(optimizer.iterations.numpy()) == 6
  _assert_state_equal(model, optimizer, jax_side, "orbax")


# Two steps of the two engines from one state, on the same batches: the
# engines' kernels round differently (test_tf1_training_parity.py: 2e-5
# relative in the losses over the first steps), and a randomly initialised
# batch-norm network amplifies rounding in its early layers' updates (issue
# 19: two correct batch norms differ by 0.4-4% in ResNet gradients). Since
# issue 20 the JAX batch norm sums channels by reduction and TensorFlow's by
# matmul: per variable |switched - resumed| / |resumed - before| then
# reached 2.4% (stem and first shortcut kernels, CI clone) and 10% (stem,
# one loaded run) where it was at most 4.4e-4 with one sum form. A JAX
# engine that zeroed the momentum slots it was handed: median 0.6, at most
# 1.4, and 1.9% in the total loss. So: the median ratio within 2%, every
# variable within 25%.
LOSS_RTOL, LOSS_ATOL = 1e-3, 1e-4  # The progress line prints 4 decimals.
UPDATE_MEDIAN = 2e-2  # Median over variables of the ratio above.
UPDATE_RTOL = 0.25  # |switched - resumed| <= UPDATE_RTOL * |resumed - before|
UPDATE_ATOL = 1e-6  # Biases in front of a batch norm: rounding only.


def _losses(text, step):
  """The loss terms of the progress line of `step`."""
  for line in text.splitlines():
    m = LINE.match(line)
    if m and int(m.group(1)) == step:
      return [float(m.group(3 + i)) for i in range(len(train_loop.LOSS_KEYS))]
  raise AssertionError(f"no progress line of step {step} in:\n{text}")


def _assert_continues(switched_state, resumed, before, names):
  """Per variable (every weight, statistic and slot), the switched run's
  move from `before` is the same-engine resume's, to rounding."""
  assert set(switched_state) == set(resumed) == set(before)
  bad, ratios = {}, []
  for key, ref in resumed.items():
    moved = float(np.linalg.norm(ref - before[key]))
    diff = float(np.linalg.norm(switched_state[key] - ref))
    if not diff <= UPDATE_RTOL * moved + UPDATE_ATOL:
      bad[names[key]] = (diff, moved)
    if moved > 1e-5:
      ratios.append(diff / moved)
  assert not bad, bad
  # Most variables move: a switched state equal to `before` would pass.
  assert len(ratios) > 0.5 * len(resumed)
  assert float(np.median(ratios)) <= UPDATE_MEDIAN, sorted(ratios)[-10:]


@pytest.mark.slow
def test_a_switched_resume_continues_as_a_same_engine_resume(switched,
                                                             jax_side):
  """TF -> JAX from ckpt-4 and TF -> TF from ckpt-4 take the same two steps
  (losses and every variable and slot to rounding); JAX -> TF from
  checkpoints/6 and JAX -> JAX likewise."""
  run = switched["model_dir"]
  config = run / "config.gin"
  for ours, same_engine, step in (("jax_to_6", "tf_resumed_to_6", 6),
                                  ("tf_to_8", "jax_resumed_to_8", 8)):
    np.testing.assert_allclose(
        _losses(switched[ours], step), _losses(switched[same_engine], step),
        rtol=LOSS_RTOL, atol=LOSS_ATOL, err_msg=f"{ours} vs {same_engine}")
  before, names = _tf_state(config, run / "ckpt-4")
  resumed, _ = _tf_state(config, switched["tf_resumed"] / "ckpt-6")
  after = {k[len("orbax/"):]: v for k, v in jax_side.items()
           if k.startswith("orbax/")}
  _assert_continues(after, resumed, before, names)
  before = after  # JAX's step 6, which the TensorFlow loop went on from.
  switched_8, _ = _tf_state(config, run / "ckpt-8")
  resumed = {k[len("orbax8/"):]: v for k, v in jax_side.items()
             if k.startswith("orbax8/")}
  _assert_continues(switched_8, resumed, before, names)


@pytest.mark.slow
def test_an_optimizer_that_cannot_take_the_state_is_refused(switched):
  """TF1's momentum form where the JAX run trained Keras': one line."""
  from official_shapemask.training import engine_switch  # pylint: disable=g-import-not-at-top
  from official_shapemask.training import optimizers  # pylint: disable=g-import-not-at-top
  from official_shapemask.weights import errors  # pylint: disable=g-import-not-at-top
  at6 = switched["at6"]
  model, sgd = _build(at6 / "config.gin")  # The JAX run's optimizer.
  optimizer = optimizers.TF1Momentum(learning_rate=0.01)
  optimizer.build(model.trainable_variables)
  before = [v.numpy().copy() for v in model.variables]
  printed = []
  with pytest.raises(errors.CheckpointError) as err:
    engine_switch.resume(model, optimizer, str(at6), "tensorflow", 4,
                         print_fn=printed.append)
  assert str(err.value) == (
      f"cannot resume from the JAX engine's checkpoint {at6}/checkpoints/6 "
      "(step 6): its optimizer is SGD, this run's is TF1Momentum, so its "
      f"{len(sgd.variables)} optimizer variables (e.g. "
      "sgd/shapemask_fine_mask_head_fine_mask_prob_fc_bias_momentum) cannot "
      "carry over. Set build_momentum_optimizer.momentum_form='keras' as in "
      f"that run (its config: {at6}/config.gin), or train in a new "
      "--model_dir")
  assert not printed
  for a, v in zip(before, model.variables):
    np.testing.assert_array_equal(a, v.numpy())


@pytest.mark.slow
def test_a_damaged_step_of_the_other_engine_is_one_line(switched, tmp_path):
  """The newer Orbax step's largest file cut in half: named, with what to
  do; nothing is moved (the other engine's run may still own it)."""
  from official_shapemask.training import engine_switch  # pylint: disable=g-import-not-at-top
  from official_shapemask.weights import errors  # pylint: disable=g-import-not-at-top
  run = tmp_path / "run"
  shutil.copytree(switched["at6_orbax"], run)
  step = run / "checkpoints" / "6"
  largest = max((p for p in step.rglob("*") if p.is_file()),
                key=lambda p: p.stat().st_size)
  largest.write_bytes(largest.read_bytes()[:largest.stat().st_size // 2])
  model, optimizer = _build(run / "config.gin")
  with pytest.raises(errors.CheckpointUnreadableError) as err:
    engine_switch.resume(model, optimizer, str(run), "tensorflow", 4)
  message = str(err.value)
  assert message.startswith(f"checkpoint {step} cannot be read ("), message
  assert message.endswith(
      f"); move it out of {run} (e.g. into {run}/unreadable/) to use the "
      "step before it"), message
  assert "\n" not in message and "Traceback" not in message
  assert step.is_dir() and not (run / "unreadable").exists()


@pytest.mark.slow
def test_export_and_predict_take_the_newest_step_of_either_engine(
    switched, tmp_path, capsys):
  from official_shapemask.modeling import factory  # pylint: disable=g-import-not-at-top
  from official_shapemask.serving import export  # pylint: disable=g-import-not-at-top
  from official_shapemask.serving import predictor  # pylint: disable=g-import-not-at-top
  from official_shapemask.training import gin_utils  # pylint: disable=g-import-not-at-top
  orbax, at6 = switched["at6_orbax"], switched["at6"]
  run = switched["model_dir"]
  export_dir = tmp_path / "saved_model"
  result = subprocess.run(
      [sys.executable, str(REPO_ROOT / "tools" / "export_saved_model.py"),
       f"--gin_file={orbax / 'config.gin'}", f"--checkpoint={orbax}",
       f"--export_dir={export_dir}"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=TIMEOUT,
      # tools/ runs the checkout's package, not an installed one.
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=str(REPO_ROOT)),
      check=False)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
  lines = result.stdout.splitlines()
  assert (f"Using step 6 of {orbax}: the JAX engine's checkpoint "
          f"{orbax}/checkpoints/6 (newer than the TensorFlow engine's step "
          "4)") in lines
  assert f"Restored {orbax}/checkpoints/6" in lines
  assert export.read_metadata(str(export_dir))["checkpoint"] == (
      f"{orbax}/checkpoints/6")
  keras.mixed_precision.set_global_policy("float32")
  gin_utils.parse_config([str(at6 / "config.gin")])
  capsys.readouterr()
  try:
    # At one step, the weights file (no conversion) of the same state.
    assert export.restore_model(factory.build_shapemask_model(),
                                str(at6)) == str(at6 / "shapemask-6.weights.h5")
    printed = capsys.readouterr().out.splitlines()
    # predict.py --checkpoint (Predictor.from_checkpoint) on the final run.
    served = predictor.Predictor.from_checkpoint(
        factory.build_shapemask_model(), str(run))
    printed_predict = capsys.readouterr().out.splitlines()
  finally:
    gin.clear_config()
  assert (f"Using step 6 of {at6}: the JAX engine's weights file "
          f"{at6}/shapemask-6.weights.h5 (newer than the TensorFlow engine's "
          "step 4)") in printed
  assert (f"Using step 8 of {run}: the TensorFlow engine's checkpoint "
          f"{run}/ckpt-8 (newer than the JAX engine's step 6)"
          ) in printed_predict
  assert served.source == f"checkpoint {run}/ckpt-8"


@pytest.mark.slow
def test_eval_under_either_engine_takes_the_others_newest_step(switched,
                                                               tmp_path):
  from official_shapemask.modeling import factory  # pylint: disable=g-import-not-at-top
  from official_shapemask.serving import export  # pylint: disable=g-import-not-at-top
  from official_shapemask.training import controller  # pylint: disable=g-import-not-at-top
  from official_shapemask.training import gin_utils  # pylint: disable=g-import-not-at-top
  run, orbax = switched["model_dir"], switched["at6_orbax"]
  out = switched["jax_eval"]
  assert (f"Evaluating step 8 from the TensorFlow engine's checkpoint "
          f"{run}/ckpt-8") in out.splitlines()
  assert "Evaluation at step 8 (4 images" in out
  assert json.loads((run / "eval_8.json").read_text())["step"] == 8
  # A directory with the JAX engine's checkpoints only has a checkpoint.
  only = tmp_path / "orbax_only"
  shutil.copytree(orbax / "checkpoints", only / "checkpoints")
  assert controller.build(str(only)).has_checkpoint()
  assert not controller.build(str(tmp_path / "none")).has_checkpoint()
  # --mode=eval under TensorFlow: the JAX engine's newer step 6.
  keras.mixed_precision.set_global_policy("float32")
  gin_utils.parse_config([str(orbax / "config.gin")])
  printed = []
  try:
    exp = controller.build(str(orbax), print_fn=printed.append)
    try:
      exp.start("eval")
      assert exp.restore_latest() == f"{orbax}/checkpoints/6"
      assert exp.step == 6
      weights = [v.numpy() for v in exp.engine.model.weights]
    finally:
      exp.close()
    reference = factory.build_shapemask_model()
    export.restore_model(reference, str(switched["at6"] /
                                        "shapemask-6.weights.h5"))
  finally:
    gin.clear_config()
  assert (f"Evaluating step 6 from the JAX engine's checkpoint "
          f"{orbax}/checkpoints/6") in printed
  # The weights the JAX run wrote at step 6, exactly.
  for a, b in zip(weights, reference.weights):
    np.testing.assert_array_equal(a, b.numpy())
  assert (orbax / "eval_config.gin").is_file()


def test_without_jax_the_tensorflow_engine_says_what_to_do(tmp_path,
                                                           monkeypatch):
  """A newer Orbax step and no JAX: one line, what to install or move."""
  from official_shapemask.training import engine_switch  # pylint: disable=g-import-not-at-top
  from official_shapemask.weights import any_engine  # pylint: disable=g-import-not-at-top
  from official_shapemask.weights import errors  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(any_engine, "engine_available",
                      lambda engine: engine == "tensorflow")
  run = tmp_path / "run"
  tf.train.CheckpointManager(tf.train.Checkpoint(v=tf.Variable(1.0)),
                             str(run), 3).save(4)
  (run / "checkpoints" / "6").mkdir(parents=True)
  for call in (lambda: engine_switch.resume(None, None, str(run),
                                            "tensorflow", 4),
               lambda: engine_switch.restore_for_eval(None, None, str(run),
                                                      "tensorflow")):
    with pytest.raises(errors.CheckpointError) as err:
      call()
    assert str(err.value) == (
        f"the JAX engine's checkpoint {run}/checkpoints/6 (step 6) is read "
        "by the JAX engine, which is not installed: pip install "
        f"official_shapemask[jax], or move {run}/checkpoints out of {run} to "
        "start from step 4")
  # Nothing newer of the other engine: this engine's own restore goes on.
  assert engine_switch.resume(None, None, str(run), "tensorflow", 6) is None
