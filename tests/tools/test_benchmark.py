"""tools/bench: benchmark.py (and its workers) and gpu_benchmark.sh.

Fast: the synthetic JAX batch follows the training-batch contract, gin
settings reach the model kwargs, failed and timed-out measurements are
reported without stopping a run, and the GPU script's CPU path (JAX backend,
the smallest model, no TensorFlow in the measurement processes) produces
training images/s and inference ms/image. Slow: a side-by-side TensorFlow
run against tf-models-official's port and the two-worker scaling run, both
on a tiny model.
"""
import argparse
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from tools.bench import common
from tools.bench import runner as runner_lib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def _run(args, timeout, env=None):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="",
             **(env or {}))
  proc = subprocess.run(args, capture_output=True, text=True, env=env,
                        cwd=REPO_ROOT, timeout=timeout, check=False)
  lines = [json.loads(l) for l in proc.stdout.splitlines()
           if l.startswith("{")]
  return proc, lines


def test_synthetic_batch_follows_the_training_contract():
  kwargs = common.model_kwargs("micro")
  images, labels = common.synthetic_batch(kwargs, batch_size=3, seed=5)
  size, classes = kwargs["image_size"], kwargs["num_classes"]
  from official_shapemask.ops import anchors
  total = anchors.num_anchors((size, size), 3, 5)
  assert images.shape == (3, size, size, 3) and images.dtype == np.float32
  cls = labels["cls_targets"]
  assert cls.shape == (3, total) and cls.dtype == np.int32
  positive = cls > 0
  assert set(np.unique(cls[~positive])) <= {-2, -1}
  assert cls.max() < classes
  np.testing.assert_array_equal(positive.sum(1), labels["num_positives"])
  assert labels["box_targets"].shape == (3, total, 4)
  assert not labels["box_targets"][~positive].any()
  n, m = kwargs["num_mask_slots"], kwargs["mask_crop_size"]
  boxes, outer = labels["mask_boxes"], labels["mask_outer_boxes"]
  assert boxes.shape == outer.shape == (3, n, 4)
  assert (boxes[..., 2:] > boxes[..., :2]).all()
  assert (outer >= 0).all() and (outer <= size).all()
  assert (outer[..., :2] <= boxes[..., :2]).all()
  assert (outer[..., 2:] >= np.minimum(boxes[..., 2:], size)).all()
  assert labels["mask_classes"].dtype == np.int32
  assert labels["mask_classes"].min() >= 1
  assert labels["mask_targets"].shape == (3, n, m, m)
  assert labels["fine_mask_targets"].shape == (3, n, 4 * m, 4 * m)
  assert set(np.unique(labels["fine_mask_targets"])) == {0.0, 1.0}
  np.testing.assert_array_equal(labels["image_info"][0],
                                [[size, size], [size, size], [1, 1], [0, 0]])


def test_gin_files_set_the_model_kwargs():
  import gin
  try:
    kwargs = common.model_kwargs(
        None, ["tiny_cpu.gin"], ["IMAGE_SIZE = 256"],
        overrides={"backbone_depth": 18})
  finally:
    gin.clear_config()
  assert kwargs["image_size"] == 256  # The binding wins over the file.
  assert kwargs["backbone_depth"] == 18  # The command line wins over gin.
  assert kwargs["backbone_width_multiplier"] == 0.5
  assert kwargs["max_level"] == 5 and kwargs["fpn_num_filters"] == 64
  assert kwargs["norm_momentum"] == 0.9
  assert "shape_prior_path" not in kwargs
  with pytest.raises(FileNotFoundError, match="no_such.gin"):
    common.model_kwargs(None, ["no_such.gin"])


def _runner(tmp_path):
  args = argparse.Namespace(backend="jax", output=str(tmp_path / "o.jsonl"),
                            barrier_timeout=0)
  return runner_lib.Runner(args, str(tmp_path))


def _micro_spec(tmp_path, kind):
  kwargs = common.model_kwargs("micro")
  kwargs.pop("num_clusters")
  prior = common.write_priors(str(tmp_path / "p.npy"), 91, 2, 32)
  return {"backend": "jax", "config": "micro", "model": kwargs,
          "batch_size": 1, "precision": "float32", "steps": 1, "warmup": 0,
          "infer_steps": 1, "prior_path": prior, "kind": kind,
          "impl": "ours"}


def test_a_failed_or_timed_out_measurement_is_recorded(tmp_path):
  runner = _runner(tmp_path)
  spec = _micro_spec(tmp_path, "no_such_kind")
  record = runner.run(spec, timeout=120)
  assert record["ok"] is False and "no_such_kind" in record["error"]
  slow = runner.run(_micro_spec(tmp_path, "jax_train"), timeout=2)
  assert slow["ok"] is False and "timeout 2 s" in slow["error"]
  lines = (tmp_path / "o.jsonl").read_text().splitlines()
  assert len(lines) == 2 and all(json.loads(l)["ok"] is False for l in lines)


def test_torch_peer_runs_first_then_ours_in_parallel():
  calls = []

  class FakeRunner:

    def _record(self, spec):
      measure = spec["kind"].split("_")[1]
      key = "images_per_s" if measure == "train" else "ms_per_image"
      return {"ok": True, "measure": measure, "impl": spec["impl"],
              "batch_size": spec["batch_size"], key: 1.0}

    def run(self, spec, timeout):
      calls.append(("alone", spec["kind"], spec["batch_size"], timeout))
      return self._record(spec)

    def run_parallel(self, specs, timeout):
      calls.append(("parallel", [(s["kind"], s["batch_size"]) for s in specs],
                    timeout))
      return [self._record(s) for s in specs]

  args = argparse.Namespace(batch_sizes=[8, 16], infer_batch_size=1,
                            skip_train=False, skip_infer=False, peer=True,
                            torch_batch_sizes=[8], parallel=True,
                            timeout=400, precision="mixed_bfloat16")
  base = {"config": "r101_1024", "model": {"image_size": 1024}}
  summary = runner_lib.run_jax(args, FakeRunner(), base)
  assert calls[0] == ("alone", "torch_train", 8, 400)
  assert calls[1][0] == "parallel" and 60 <= calls[1][2] <= 400
  assert calls[1][1] == [("jax_train", 8), ("jax_train", 16), ("jax_infer", 1)]
  assert summary["torchvision_train_images_per_s_b8"] == 1.0
  assert summary["ours_infer_ms_per_image_b1"] == 1.0
  assert summary["failed"] == []


class _RecordingRunner:
  """Stands in for `runner.Runner`: records what would run, and how."""

  def __init__(self):
    self.calls = []

  @staticmethod
  def _record(spec):
    measure = spec["kind"].split("_")[1]
    key = "images_per_s" if measure == "train" else "ms_per_image"
    return {"ok": True, "measure": measure, "impl": spec["impl"],
            "batch_size": spec["batch_size"], key: 1.0, "mfu": 0.25,
            "levers": spec.get("levers"),
            "model_overrides": spec.get("model_overrides"),
            "torch_variant": spec.get("torch_variant")}

  def run(self, spec, timeout):
    self.calls.append(("alone", spec))
    return self._record(spec)

  def run_parallel(self, specs, timeout):
    self.calls.append(("parallel", specs))
    return [self._record(s) for s in specs]


def _jax_args(**kwargs):
  values = dict(batch_sizes=[8], infer_batch_size=1, skip_train=False,
                skip_infer=False, peer=True, torch_batch_sizes=None,
                parallel=False, timeout=400, precision="mixed_bfloat16")
  values.update(kwargs)
  return argparse.Namespace(**values)


@pytest.mark.parametrize("parallel", [False, True])
def test_skip_train_runs_no_training(parallel):
  """--skip_train without --parallel used to train anyway (issue 20)."""
  runner = _RecordingRunner()
  base = {"config": "r101_1024", "model": {"image_size": 1024}}
  summary = runner_lib.run_jax(
      _jax_args(skip_train=True, parallel=parallel, infer_batch_size=8,
                variant=["keras_batch_norm@16"]), runner, base)
  specs = [s for how, got in runner.calls
           for s in (got if how == "parallel" else [got])]
  assert [(s["kind"], s["batch_size"]) for s in specs] == [("jax_infer", 8)]
  assert summary["ours_infer_ms_per_image_b8"] == 1.0
  assert not any("train" in key for key in summary)


def test_variants_torch_variants_and_mfu_in_the_summary():
  runner = _RecordingRunner()
  base = {"config": "r101_1024", "model": {"image_size": 1024},
          "levers": [], "peak_tflops": 790.0}
  args = _jax_args(parallel=True, batch_sizes=[8, 16],
                   infer_batch_sizes="1,8",
                   variant=["bn_float32_io+bn_matmul_sums@16",
                            "infer:pre_nms_num_boxes=1000@1"],
                   torch_batch_sizes=[8, 16],
                   torch_variants=["eager", "channels_last@8",
                                   "channels_last+compile@8"])
  summary = runner_lib.run_jax(args, runner, base)
  alone = [s for how, s in runner.calls if how == "alone"]
  parallel = [s for how, specs in runner.calls if how == "parallel"
              for s in specs]
  # Eager torchvision first, alone; the compiled variant compiles with ours.
  assert [(s["torch_variant"], s["batch_size"]) for s in alone] == [
      ("eager", 8), ("eager", 16), ("channels_last", 8)]
  assert [(s["kind"], s["batch_size"], s.get("levers"), s.get("nice", 0),
           s.get("extra", False)) for s in parallel] == [
               ("jax_train", 8, [], 0, False), ("jax_train", 16, [], 0, False),
               ("jax_infer", 1, [], 0, False), ("jax_infer", 8, [], 0, False),
               ("jax_train", 16, ["bn_float32_io", "bn_matmul_sums"], 10,
                True),
               ("jax_infer", 1, [], 10, True),
               ("torch_train", 8, [], 10, True)]
  assert parallel[5]["model"] == {"image_size": 1024,
                                  "pre_nms_num_boxes": 1000}
  assert parallel[0]["model"] == {"image_size": 1024}
  assert parallel[-1]["torch_variant"] == "channels_last+compile"
  key = "ours[bn_float32_io+bn_matmul_sums]_train_images_per_s_b16"
  assert summary[key] == 1.0 and summary["ours_train_images_per_s_b16"] == 1.0
  assert summary["torchvision[channels_last+compile]_train_images_per_s_b8"]
  assert summary["ours_infer_mfu_b8"] == 0.25
  assert summary["ours[pre_nms_num_boxes=1000]_infer_ms_per_image_b1"] == 1.0
  assert summary["peak_tflops"] == 790.0 and summary["failed"] == []


def test_extras_do_not_hold_up_the_main_measurements(tmp_path):
  import threading
  sync = str(tmp_path)
  main = {"sync_dir": sync, "id": 1, "num_main_parties": 1,
          "barrier_timeout_s": 60}
  extra = dict(main, id=2, extra=True)
  entered = threading.Event()

  def extra_party():
    with common.timing_turn(extra):
      entered.set()

  thread = threading.Thread(target=extra_party)
  thread.start()
  # The extra is compiled but waits for the main party...
  assert not entered.wait(1.0)
  assert os.path.exists(os.path.join(sync, "ready-extra-2"))
  # ...which does not wait for the extra to be timed: it takes the turn as
  # soon as it is ready itself (the only main party).
  with common.timing_turn(main):
    assert os.path.exists(os.path.join(sync, "ready-main-1"))
  assert entered.wait(30)
  thread.join()


def test_bad_variants_are_refused_with_one_line():
  with pytest.raises(ValueError, match="no_such_lever@16"):
    runner_lib.parse_variants(["no_such_lever@16"])
  with pytest.raises(ValueError, match="PART"):
    runner_lib.parse_variants(["keras_batch_norm"])
  assert runner_lib.parse_variants(["bn_float32_io+bn_matmul_sums@4"]) == [
      {"measure": "train", "levers": ["bn_float32_io", "bn_matmul_sums"],
       "overrides": {}, "batch_size": 4}]
  assert runner_lib.parse_variants(
      ["infer:unfolded_inference_norms+pre_nms_num_boxes=1000@1"]) == [
          {"measure": "infer", "levers": ["unfolded_inference_norms"],
           "overrides": {"pre_nms_num_boxes": 1000}, "batch_size": 1}]
  with pytest.raises(ValueError, match="no_such_setting"):
    runner_lib.parse_variants(["infer:no_such_setting=3@1"])
  with pytest.raises(ValueError, match="eval:"):
    runner_lib.parse_variants(["eval:keras_batch_norm@1"])
  assert common.torch_variant_ok("channels_last+compile")
  assert not common.torch_variant_ok("eager+compile")
  assert not common.torch_variant_ok("compile+compile_all")
  assert not common.torch_variant_ok("fast")


def test_mfu_fields():
  from tools.bench import cost_analysis
  fields = cost_analysis.mfu_fields(3.924e12, 0.1, 790.0, batch_size=2)
  assert fields["tflops_per_s"] == pytest.approx(39.24)
  assert fields["mfu"] == pytest.approx(39.24 / 790.0, abs=1e-4)
  assert fields["tflop_per_image"] == pytest.approx(1.962)
  assert cost_analysis.mfu_fields(None, 0.1, 790.0)["mfu"] is None


def test_gpu_script_cpu_path(tmp_path):
  """The GPU script end to end on CPU: JAX backend, micro model."""
  out = tmp_path / "out"
  proc, lines = _run(["bash", "tools/bench/gpu_benchmark.sh", "--cpu_smoke"],
                     timeout=1500, env={"PYTHON": sys.executable,
                                       "OUT": str(out)})
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  records = [json.loads(l) for l in
             (out / "gpu_benchmark.jsonl").read_text().splitlines()]
  train = {r["batch_size"]: r for r in records
           if r.get("measure") == "train" and r["impl"] == "ours" and
           not r.get("levers")}
  infer = [r for r in records if r.get("measure") == "infer"]
  assert sorted(train) == [1, 2]
  for r in train.values():
    assert r["ok"] and r["backend"] == "jax" and r["images_per_s"] > 0
    assert r["compile_s"] > 0 and np.isfinite(r["total_loss"])
  assert len(infer) == 1 and infer[0]["ok"] and infer[0]["ms_per_image"] > 0
  assert infer[0]["num_detections"] == [20]  # Every slot filled.
  summary = records[-1]
  assert summary["summary"] and summary["failed"] == []
  assert summary["ours_train_images_per_s_b2"] == train[2]["images_per_s"]
  env = json.loads((out / "environment.json").read_text())
  assert env["mode"] == "cpu_smoke" and "jax" in env
  assert (out / "worker_logs.tar.gz").stat().st_size > 0
  assert all("TrainStep" in r["step"] for r in train.values())
  # FLOPs from the compiled step's cost analysis, TFLOP/s and MFU.
  for r in list(train.values()) + infer:
    assert r["step_flops"] > 0 and r["lowered_flops"] > 0, r
    assert r["mfu"] > 0 and r["peak_tflops"] == 790
    assert r["tflops_per_s"] == pytest.approx(
        r["step_flops"] / r["median_step_s"] / 1e12, rel=0.02)
  # The A/B variant (the batch norm before issue 20) ran beside them.
  variant = [r for r in records if r.get("levers")]
  assert len(variant) == 1 and variant[0]["ok"], variant
  assert variant[0]["levers"] == ["bn_float32_io", "bn_matmul_sums"]
  assert "ours[bn_float32_io+bn_matmul_sums]_train_images_per_s_b1" in summary
  # The input pipeline is measured apart (TensorFlow is importable here).
  rows = [json.loads(l) for l in
          (out / "input_pipeline.jsonl").read_text().splitlines()]
  assert rows and all(r["images_per_s"] > 0 for r in rows), proc.stderr
  assert "input pipeline all_cores 128 px" in proc.stdout
  # The table closes the output.
  assert "images/s" in proc.stdout.splitlines()[-5]
  assert "MFU against 790" in proc.stdout.splitlines()[-6]
  if importlib.util.find_spec("torch") is None:
    assert "torchvision peer skipped" in proc.stderr


@pytest.mark.slow
def test_side_by_side_with_the_model_garden_port(tmp_path):
  pytest.importorskip("official.legacy.detection.modeling.factory")
  proc, lines = _run(
      [sys.executable, "-m", "tools.bench.benchmark", "--config=tiny",
       "--peer", "--steps=2", "--warmup=1", "--infer_steps=2", "--timeout=900",
       f"--workdir={tmp_path}"], timeout=2400)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  measured = [l for l in lines if "measure" in l]
  assert [(l["impl"], l["measure"]) for l in measured] == [
      ("ours", "train"), ("peer", "train"), ("ours", "infer"),
      ("peer", "infer")]
  assert all(l["ok"] for l in measured)
  # Average busy cores over the timed steps: some, at most the machine's.
  assert all(0 < l["cpu_cores_busy"] <= os.cpu_count() + 0.5
             for l in measured)
  summary = lines[-1]
  for key in ("train_ratio", "infer_ratio", "ours_peak_gib",
              "peer_peak_gib"):
    assert summary[key] > 0, key
  assert summary["train_ratio"] == pytest.approx(
      summary["ours_train_step_s"] / summary["peer_train_step_s"], rel=1e-3)
  assert any("fine head" in s for s in summary["not_equal"])
  assert summary["ours_settings"] == {"clip": 1.0, "nesterov": True,
                                     "freeze_early_norms": True}
  for l in measured:
    if l["measure"] == "infer":
      assert l["num_detections"] == [100, 100]


@pytest.mark.slow
def test_two_workers_on_loopback(tmp_path):
  proc, lines = _run(
      [sys.executable, "-m", "tools.bench.benchmark", "--config=tiny",
       "--workers=2", "--steps=3", "--warmup=1", "--timeout=900", f"--workdir={tmp_path}"],
      timeout=2400)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  workers = [l for l in lines if l.get("strategy") == "multi_worker"]
  assert len(workers) == 2 and all(w["replicas"] == 2 for w in workers)
  summary = lines[-1]
  assert summary["measure"] == "scaling" and summary["num_workers"] == 2
  # A ratio of two timings: positive and finite; its size depends on the
  # machine's load (1.99 once on this shared machine), so it is not bounded.
  assert 0 < summary["efficiency"] < float("inf")
  assert summary["multi_images_per_s"] > 0
