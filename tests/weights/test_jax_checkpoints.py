"""The JAX engine's Orbax checkpoints (a JAX subprocess, no ShapeMask).

They give back exactly the saved state (weights, batch-norm statistics,
frozen variables, the optimizer's step and momentum), keep the newest
`max_to_keep`, and refuse another model's checkpoint naming it.
"""
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
