"""TensorFlow measurements: our model (the custom loop's replica step) and
tf-models-official's legacy ShapeMask (the Model Garden port)."""

import time

from tools.bench import common


def _tf_setup(spec):
  import tensorflow as tf
  threads = int(spec.get("threads") or 0)
  if threads:
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
  return tf


def _ours_tf_dataset(spec, kw):
  """Our parser over the synthetic records; `num_batches` cached batches."""
  from official_shapemask.dataloaders import input_reader
  from official_shapemask.dataloaders import shapemask_parser
  parser = shapemask_parser.Parser(
      output_size=kw["image_size"], min_level=kw["min_level"],
      max_level=kw["max_level"], num_scales=kw["num_scales"],
      aspect_ratios=tuple(kw["aspect_ratios"]),
      anchor_size=kw["anchor_size"], num_sampled_masks=kw["num_mask_slots"],
      mask_crop_size=kw["mask_crop_size"],
      upsample_factor=kw["upsample_factor"],
      outer_box_scale=kw["outer_box_scale"],
      use_bfloat16=spec["precision"] == "mixed_bfloat16", mode="train",
      seed=0)
  dataset = input_reader.build_dataset(
      spec["records"], parser, spec["batch_size"], is_training=True,
      deterministic=True, seed=0)
  return dataset.take(spec["num_batches"]).cache().repeat()


def _ours_tf_model(spec, strategy):
  import keras
  from official_shapemask.modeling import factory
  keras.mixed_precision.set_global_policy(spec["precision"])
  with strategy.scope():
    model = factory.build_shapemask_model(
        shape_prior_path=spec["prior_path"], **spec["model"])
  return model


def _tf_strategy(spec, tf):
  if spec.get("strategy") == "multi_worker":
    options = tf.distribute.experimental.CommunicationOptions(
        timeout_seconds=spec.get("collective_timeout_s", 600))
    return tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=options)
  return tf.distribute.OneDeviceStrategy("/cpu:0")


def worker_ours_train(spec):
  tf = _tf_setup(spec)
  import keras
  from official_shapemask.training import train_loop
  kw = spec["model"]
  strategy = _tf_strategy(spec, tf)
  t = time.perf_counter()
  model = _ours_tf_model(spec, strategy)
  with strategy.scope():
    optimizer = keras.optimizers.SGD(learning_rate=1e-3, momentum=0.9,
                                     nesterov=spec["nesterov"])
    optimizer.build(model.trainable_variables)
  build_s = time.perf_counter() - t
  dataset = strategy.distribute_datasets_from_function(
      lambda ctx: _ours_tf_dataset(spec, kw))
  iterator = iter(dataset)
  loop = train_loop.TrainLoop(strategy, model, optimizer,
                              gradient_clip_norm=spec["clip"],
                              jit_compile=False)
  t = time.perf_counter()
  losses = loop.run(iterator, 1)[-1]
  first = time.perf_counter() - t
  def step():
    losses.update(loop.run(iterator, 1)[-1])

  times = common.timed_steps(step, spec["warmup"], spec["steps"])
  replicas = strategy.num_replicas_in_sync
  median = common.median(times)
  return {
      "profile": common.profile(spec, step),
      "build_s": round(build_s, 2), "first_step_s": round(first, 2),
      "median_step_s": round(median, 4),
      "images_per_s": round(spec["batch_size"] * replicas / median, 3),
      "replicas": replicas, "step_times_s": [round(x, 3) for x in times],
      "total_loss": round(losses["total_loss"], 4),
      "step": "TrainLoop.replica_step (custom tf.distribute loop)",
  }


def worker_ours_infer(spec):
  tf = _tf_setup(spec)
  strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
  t = time.perf_counter()
  model = _ours_tf_model(spec, strategy)
  build_s = time.perf_counter() - t
  common.redraw_class_predictor(spec, model.head.class_predict.kernel,
                          model.head.class_predict.bias)
  images, labels = next(iter(_ours_tf_dataset(spec, spec["model"])))

  @tf.function
  def predict(images, image_info):
    out = model({"images": images, "image_info": image_info}, training=False)
    return out["num_detections"], out["detection_masks"]

  def step():
    num, masks = predict(images, labels["image_info"])
    step.num = num.numpy()
    masks.numpy()

  t = time.perf_counter()
  step()
  first = time.perf_counter() - t
  times = common.timed_steps(step, spec["warmup"], spec["infer_steps"])
  median = common.median(times)
  return {
      "profile": common.profile(spec, step),
      "build_s": round(build_s, 2), "first_step_s": round(first, 2),
      "median_step_s": round(median, 4),
      "ms_per_image": round(1000 * median / spec["batch_size"], 2),
      "num_detections": [int(x) for x in step.num],
      "step_times_s": [round(x, 3) for x in times],
  }


# ------------------------------------------ TensorFlow: the Model Garden port
def _peer_setup(spec):
  tf = _tf_setup(spec)
  from official.legacy.detection.dataloader import input_reader
  from official.legacy.detection.dataloader import mode_keys
  from official_shapemask.weights import legacy_shapemask
  params = legacy_shapemask.legacy_params(
      spec["model"], batch_size=spec["batch_size"],
      shape_prior_path=spec["prior_path"],
      train_file_pattern=spec["records"], nesterov=spec["nesterov"])
  dataset = input_reader.InputFn(spec["records"], params, mode_keys.TRAIN,
                                 spec["batch_size"])()
  dataset = dataset.take(spec["num_batches"]).cache().repeat()
  return tf, params, dataset, legacy_shapemask


def worker_peer_train(spec):
  tf, params, dataset, legacy_shapemask = _peer_setup(spec)
  strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
  iterator = iter(strategy.experimental_distribute_dataset(dataset))
  t = time.perf_counter()
  with strategy.scope():
    model, builder = legacy_shapemask.build_legacy_model(params, "train")
    loss_fn = builder.build_loss_fn()
    optimizer = model.optimizer
    trainable = builder.make_filter_trainable_variables_fn()(
        model.trainable_variables)
  build_s = time.perf_counter() - t

  def replicated_step(inputs):
    # The body of the port's DetectionDistributedExecutor replicated step.
    inputs, labels = inputs
    with tf.GradientTape() as tape:
      outputs = model(inputs, training=True)
      all_losses = loss_fn(labels, outputs)
      losses = {k: tf.reduce_mean(v) for k, v in all_losses.items()}
      loss = losses["total_loss"] / strategy.num_replicas_in_sync
    grads = tape.gradient(loss, trainable)
    clipped, _ = tf.clip_by_global_norm(grads, clip_norm=1.0)
    optimizer.apply_gradients(zip(clipped, trainable))
    return losses

  @tf.function
  def train_step(it):
    per_replica = strategy.run(replicated_step, args=(next(it),))
    return tf.nest.map_structure(
        lambda x: strategy.reduce(tf.distribute.ReduceOp.MEAN, x, axis=None),
        per_replica)

  losses = {}

  def step():
    losses.update({k: float(v) for k, v in train_step(iterator).items()})

  t = time.perf_counter()
  step()
  first = time.perf_counter() - t
  times = common.timed_steps(step, spec["warmup"], spec["steps"])
  median = common.median(times)
  return {
      "profile": common.profile(spec, step),
      "build_s": round(build_s, 2), "first_step_s": round(first, 2),
      "median_step_s": round(median, 4),
      "images_per_s": round(spec["batch_size"] / median, 3),
      "step_times_s": [round(x, 3) for x in times],
      "total_loss": round(losses["total_loss"], 4),
      "trainable_vars": f"{len(trainable)}/{len(model.trainable_variables)}",
      "step": "DetectionDistributedExecutor replicated step (clip 1.0)",
  }


def worker_peer_infer(spec):
  tf, params, dataset, legacy_shapemask = _peer_setup(spec)
  t = time.perf_counter()
  model, _ = legacy_shapemask.build_legacy_model(params, "predict")
  build_s = time.perf_counter() - t
  layer = model.get_layer("class-predict")
  common.redraw_class_predictor(spec, layer.kernel, layer.bias)
  inputs, _ = next(iter(dataset))
  inputs = {"image": inputs["image"], "image_info": inputs["image_info"]}

  @tf.function
  def predict(inputs):
    out = model(inputs, training=False)
    return out["num_detections"], out["detection_masks"]

  def step():
    num, masks = predict(inputs)
    step.num = num.numpy()
    masks.numpy()

  t = time.perf_counter()
  step()
  first = time.perf_counter() - t
  times = common.timed_steps(step, spec["warmup"], spec["infer_steps"])
  median = common.median(times)
  return {
      "profile": common.profile(spec, step),
      "build_s": round(build_s, 2), "first_step_s": round(first, 2),
      "median_step_s": round(median, 4),
      "ms_per_image": round(1000 * median / spec["batch_size"], 2),
      "num_detections": [int(x) for x in step.num],
      "step_times_s": [round(x, 3) for x in times],
  }
