"""The JAX engine's Orbax checkpoints (a JAX subprocess, no ShapeMask).

They give back exactly the saved state (weights, batch-norm statistics,
frozen variables, the optimizer's step and momentum), keep the newest
`max_to_keep`, and refuse another model's checkpoint naming it.
"""
import re
import textwrap

_ROUND_TRIP = textwrap.dedent("""
    import sys
    import jax
    import keras
    import numpy as np
    from official_shapemask.weights import errors
    from official_shapemask.weights import jax_checkpoints
    from official_shapemask.training import jax_step

    def build(units):
      model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(units),
                                keras.layers.BatchNormalization(),
                                keras.layers.Dense(2)])
      model.layers[1].trainable = False  # Frozen gamma/beta + statistics.
      optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
      return model, optimizer

    model, optimizer = build(4)
    train_step = jax_step.TrainStep(model, optimizer)
    rng = np.random.default_rng(0)
    # A state unlike the initial one in every variable (step counter too).
    state = jax_checkpoints.snapshot(train_step.state())
    state = tuple([x + 7 if np.issubdtype(x.dtype, np.integer) else
                   (x + rng.normal(size=x.shape)).astype(x.dtype)
                   for x in group] for group in state)
    assert train_step.step_number(state) != 0
    manager = jax_checkpoints.CheckpointManager(sys.argv[1], train_step,
                                                max_to_keep=2)
    for step in (5, 10, 15):
      placed = train_step.place(state)
      manager.save(step, placed)
      # The state may be donated (deleted) right after `save` returns.
      jax.tree_util.tree_map(lambda x: x.delete(), placed)
    assert manager.save(15, train_step.place(state)) is False  # Exists.
    manager.wait()
    assert manager.all_steps() == [10, 15], manager.all_steps()
    assert manager.latest_checkpoint.endswith("checkpoints/15")
    restored, step = manager.restore()
    assert step == 15
    for group, (ours, theirs) in enumerate(zip(state, restored)):
      assert len(ours) == len(theirs)
      for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(np.asarray(b), a)
        assert b.sharding == train_step.state_sharding
    manager.close()

    # Another model (other widths) is refused, naming the checkpoint.
    other = jax_step.TrainStep(*build(5))
    reader = jax_checkpoints.CheckpointManager(sys.argv[1], other,
                                               read_only=True)
    try:
      reader.restore(10)
    except errors.CheckpointMismatchError as e:
      assert "checkpoints/10 does not match" in str(e), e
    else:
      raise AssertionError("a mismatched checkpoint was restored")
    # A read-only manager on a directory without checkpoints.
    empty = jax_checkpoints.CheckpointManager(sys.argv[1] + "_none", other,
                                              read_only=True)
    assert empty.latest_checkpoint is None and empty.all_steps() == []
    print("OK")
""")


def test_orbax_checkpoints_restore_the_exact_state(tmp_path, run_under_jax):
  result = run_under_jax(_ROUND_TRIP, str(tmp_path / "run"), timeout=600)
  assert result.returncode == 0 and "OK" in result.stdout, (
      result.stdout[-3000:] + result.stderr[-5000:])


_DAMAGED = textwrap.dedent("""
    import os
    import sys
    import keras
    import numpy as np
    from official_shapemask.weights import jax_checkpoints
    from official_shapemask.training import jax_step

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4),
                              keras.layers.BatchNormalization(),
                              keras.layers.Dense(2)])
    train_step = jax_step.TrainStep(model, keras.optimizers.SGD(0.1))
    run = sys.argv[1]
    manager = jax_checkpoints.CheckpointManager(run, train_step)

    def state_of(step):  # Every array holds the step number.
      return train_step.place(tuple(
          [np.full(x.shape, step, x.dtype) for x in group]
          for group in jax_checkpoints.snapshot(train_step.state())))

    def save(step):
      manager.save(step, state_of(step))
      manager.wait()

    def truncate(step):  # The arrays' data file, cut in half.
      folder = os.path.join(run, "checkpoints", str(step), "state", "d")
      [name] = os.listdir(folder)
      path = os.path.join(folder, name)
      data = open(path, "rb").read()
      open(path, "wb").write(data[:len(data) // 2])

    def delete(step):  # The arrays' manifest.
      os.remove(os.path.join(run, "checkpoints", str(step), "state",
                             "manifest.ocdbt"))

    def holds(state, step):
      return all(np.all(np.asarray(x) == step) for group in state
                 for x in group)

    for step in (5, 10, 15):
      save(step)
    truncate(15)
    printed = []
    # An evaluation falls back to the newest readable step, moving nothing.
    reader = jax_checkpoints.CheckpointManager(run, train_step, read_only=True)
    state, step = reader.restore_newest_readable(print_fn=printed.append)
    assert step == 10 and holds(state, 10), step
    assert reader.all_steps() == [5, 10, 15]
    assert not os.path.exists(os.path.join(run, "unreadable"))
    # A damaged step restored by name: one line naming it.
    try:
      reader.restore(15)
    except jax_checkpoints.CheckpointUnreadableError as e:
      printed.append(str(e))
    else:
      raise AssertionError("a damaged checkpoint was restored")
    # Training: moved aside, resumed from the one before, saved again.
    state, step = manager.restore_newest_readable(move_unreadable=True,
                                                  print_fn=printed.append)
    assert step == 10 and holds(state, 10), step
    assert manager.all_steps() == [5, 10], manager.all_steps()
    save(15)
    delete(15)  # The same step damaged again: kept beside the first.
    state, step = manager.restore_newest_readable(move_unreadable=True,
                                                  print_fn=printed.append)
    assert step == 10
    assert sorted(os.listdir(os.path.join(run, "unreadable"))) == [
        "checkpoints-15", "checkpoints-15.2"]
    # None readable: one line naming each, nothing moved.
    truncate(5)
    delete(10)
    try:
      manager.restore_newest_readable(move_unreadable=True,
                                      print_fn=printed.append)
    except jax_checkpoints.CheckpointUnreadableError as e:
      printed.append(str(e))
    else:
      raise AssertionError("no checkpoint is readable")
    assert manager.all_steps() == [5, 10]
    manager.close()
    print("\\n".join(printed))
""")


def test_damaged_checkpoints_are_named_and_skipped(tmp_path, run_under_jax):
  run = tmp_path / "run"
  result = run_under_jax(_DAMAGED, str(run), timeout=600)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
  steps = {s: run / "checkpoints" / str(s) for s in (5, 10, 15)}
  unreadable = run / "unreadable"
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 5, lines
  assert re.fullmatch(
      re.escape(f"Checkpoint {steps[15]} cannot be read (") +
      r"OUT_OF_RANGE: .+" + re.escape(f"); using {steps[10]} instead"),
      lines[0]), lines[0]
  assert re.fullmatch(re.escape(f"checkpoint {steps[15]} cannot be read (") +
                      r"OUT_OF_RANGE: .+\)", lines[1]), lines[1]
  assert re.fullmatch(
      re.escape(f"Checkpoint {steps[15]} cannot be read (") +
      r"OUT_OF_RANGE: .+" + re.escape(
          f"); moved to {unreadable / 'checkpoints-15'}; using {steps[10]} "
          "instead"), lines[2]), lines[2]
  assert lines[3] == (
      f"Checkpoint {steps[15]} cannot be read (NOT_FOUND: Metadata at "
      f"\"non_trainable.0/.zarray\" in OCDBT database at local file "
      f"\"{steps[15]}/state/\" does not exist); moved to "
      f"{unreadable / 'checkpoints-15.2'}; using {steps[10]} instead")
  assert re.fullmatch(
      re.escape(f"no checkpoint in {run / 'checkpoints'} can be read: "
                f"{steps[10]} (NOT_FOUND: ") + r".+" +
      re.escape(f"); {steps[5]} (OUT_OF_RANGE: ") + r".+" +
      re.escape("). Move them away to start from scratch, or restore them "
                "from a copy"), lines[4]), lines[4]
  # No TensorStore traceback reaches the user, on either stream.
  for text in (result.stdout, result.stderr):
    assert "Traceback" not in text and "tensorstore_spec" not in text, (
        text[-3000:])
