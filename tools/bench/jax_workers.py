"""JAX measurements on the JAX engine's own steps (no TensorFlow).

`jax_train` times `official_shapemask.training.jax_step.TrainStep`, the step
that `KERAS_BACKEND=jax python train.py` runs: the same compiled function
(forward + `compute_losses` + gradients + `optimizer.stateless_apply`),
under `keras.distribution.DataParallel` over every local device, on a
static synthetic batch placed on the devices once (input excluded: the
input pipeline is measured apart by `tools/bench/benchmark_input.py`).
`jax_infer` times `jax_step.PredictStep` (detections and the mask branch),
the engine's evaluation step.

Every result carries the step's FLOPs from XLA's cost analysis of the
compiled step (`step_flops`; the lowered module's too), the TFLOP/s the
median step time gives, and the MFU against `--peak_tflops`. A spec's
`levers` (tools/bench/cost_analysis.py) are applied before the model is
built (A/B variants of the product code).
"""

import time

from tools.bench import common
from tools.bench import cost_analysis


def _jax_model(spec):
  """Our model with the run's priors (set directly: the prior-file loader
  imports pycocotools and OpenCV, which a bare accelerator image lacks)."""
  import keras
  import numpy as np
  from official_shapemask.modeling import factory
  for lever in spec.get("levers") or []:
    cost_analysis.LEVERS[lever]()
  keras.mixed_precision.set_global_policy(spec["precision"])
  priors = np.load(spec["prior_path"])
  model = factory.build_shapemask_model(num_clusters=priors.shape[1],
                                        **spec["model"])
  model.prior_head.set_shape_priors(priors)
  return model


def _device_peak_gib():
  import jax
  try:
    stats = jax.devices()[0].memory_stats() or {}
  except Exception:  # pylint: disable=broad-except
    stats = {}
  peak = stats.get("peak_bytes_in_use")
  return round(peak / 2**30, 3) if peak else None


def _distribution(batch_size):
  """Every local device when the batch splits evenly, else the first."""
  import jax
  import keras
  from official_shapemask.training import jax_step
  devices = jax.local_devices()
  if batch_size % len(devices):
    devices = devices[:1]
  distribution = jax_step.data_parallel(devices)
  keras.distribution.set_distribution(distribution)
  return distribution


def worker_jax_train(spec):
  import jax
  import keras
  import numpy as np
  from official_shapemask.training import jax_step
  t = time.perf_counter()
  distribution = _distribution(spec["batch_size"])
  model = _jax_model(spec)
  optimizer = keras.optimizers.SGD(learning_rate=1e-3, momentum=0.9)
  train_step = jax_step.TrainStep(model, optimizer,
                                  gradient_clip_norm=spec.get("clip") or 0.0,
                                  distribution=distribution)
  build_s = time.perf_counter() - t
  batch = jax_step.shard_batch(
      common.synthetic_batch(spec["model"], spec["batch_size"]),
      distribution)
  state = train_step.state()
  t = time.perf_counter()
  lowered = train_step.lower(state, *batch)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t
  flops = cost_analysis.step_flops(lowered, compiled)
  box = {"state": state, "losses": None}

  def step():
    box["state"], box["losses"] = compiled(box["state"], *batch)
    box["losses"]["total_loss"].block_until_ready()

  with common.timing_turn(spec):
    t = time.perf_counter()
    step()
    first = time.perf_counter() - t
    times = common.timed_steps(step, spec["warmup"], spec["steps"])
  loss = float(box["losses"]["total_loss"])
  if not np.isfinite(loss):
    raise FloatingPointError(f"non-finite loss {loss}")
  median = common.median(times)
  result = {
      "build_s": round(build_s, 2), "compile_s": round(compile_s, 2),
      "first_step_s": round(first, 3), "median_step_s": round(median, 4),
      "images_per_s": round(spec["batch_size"] / median, 2),
      "step_times_s": [round(x, 4) for x in times],
      "total_loss": round(loss, 4), "device": str(jax.devices()[0]),
      "num_devices": len(distribution.device_mesh.devices.flat),
      "device_peak_gib": _device_peak_gib(),
      "step": "official_shapemask.training.jax_step.TrainStep (the step of "
              "KERAS_BACKEND=jax train.py), synthetic batch on the devices",
  }
  result.update(_flops_fields(flops, median, spec))
  return result


def _flops_fields(flops, median_s, spec):
  """FLOPs (compiled and lowered), TFLOP/s and MFU of a timed step."""
  out = dict(flops)
  out.update(cost_analysis.mfu_fields(flops["step_flops"], median_s,
                                      spec.get("peak_tflops"),
                                      spec["batch_size"]))
  return out


def worker_jax_infer(spec):
  import jax
  from official_shapemask.training import jax_step
  t = time.perf_counter()
  distribution = _distribution(spec["batch_size"])
  model = _jax_model(spec)
  build_s = time.perf_counter() - t
  common.redraw_class_predictor(spec, model.head.class_predict.kernel,
                                model.head.class_predict.bias)
  images, labels = common.synthetic_batch(spec["model"], spec["batch_size"],
                                          seed=1)
  batch = jax_step.shard_batch((images, labels["image_info"]), distribution)
  predict = jax_step.PredictStep(model, distribution)
  state = (jax.device_put([v.value for v in model.trainable_variables]),
           jax.device_put([v.value for v in model.non_trainable_variables]))
  t = time.perf_counter()
  lowered = predict.lower(state, *batch)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t
  flops = cost_analysis.step_flops(lowered, compiled)
  box = {}

  def step():
    outputs = compiled(state[0], state[1], *batch)
    box["num"] = outputs["num_detections"]
    outputs["detection_masks"].block_until_ready()

  with common.timing_turn(spec):
    t = time.perf_counter()
    step()
    first = time.perf_counter() - t
    times = common.timed_steps(step, spec["warmup"], spec["infer_steps"])
  median = common.median(times)
  result = {
      "build_s": round(build_s, 2), "compile_s": round(compile_s, 2),
      "first_step_s": round(first, 3), "median_step_s": round(median, 5),
      "ms_per_image": round(1000 * median / spec["batch_size"], 3),
      "num_detections": [int(x) for x in box["num"]],
      "step_times_s": [round(x, 5) for x in times],
      "device": str(jax.devices()[0]),
      "device_peak_gib": _device_peak_gib(),
      "step": "official_shapemask.training.jax_step.PredictStep (the JAX "
              "engine's evaluation step)",
  }
  result.update(_flops_fields(flops, median, spec))
  return result
