"""The benchmark's orchestration: measurement subprocesses and summaries.

`Runner` starts each measurement as `python -m tools.bench.benchmark --_worker
SPEC` in a subprocess of its own (its own peak memory; one failure or timeout does not
stop the run) and records its JSON line; `run_tensorflow`, `run_workers` and
`run_jax` are the three kinds of runs and return their summary line.
`run_worker` is the subprocess side: it imports only the worker family it
needs (the JAX measurements never import TensorFlow).
"""

import importlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

from tools.bench import common

CLI = "tools.bench.benchmark"  # Run as `python -m` from the repository root.
# Measurement kind -> (module of tools.bench, function).
WORKERS = {
    "ours_train": ("tf_workers", "worker_ours_train"),
    "ours_infer": ("tf_workers", "worker_ours_infer"),
    "peer_train": ("tf_workers", "worker_peer_train"),
    "peer_infer": ("tf_workers", "worker_peer_infer"),
    "jax_train": ("jax_workers", "worker_jax_train"),
    "jax_infer": ("jax_workers", "worker_jax_infer"),
    "torch_train": ("torch_workers", "worker_torch_train"),
}


def _worker(kind):
  if kind not in WORKERS:
    raise KeyError(f"unknown measurement kind {kind!r}; known: "
                   f"{sorted(WORKERS)}")
  module, name = WORKERS[kind]
  return getattr(importlib.import_module(f"tools.bench.{module}"), name)


def run_worker(spec):
  """Entry point of a measurement subprocess; prints `RESULT {json}`."""
  t = time.perf_counter()
  try:
    result = _worker(spec["kind"])(spec)
    result["ok"] = True
  except Exception as e:  # pylint: disable=broad-except
    import traceback
    traceback.print_exc()
    result = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}
  result["peak_rss_gib"] = common.peak_rss_gib()
  if common.CPU_CORES_BUSY:
    busy = common.CPU_CORES_BUSY
    result["cpu_cores_busy"] = busy[0] if len(busy) == 1 else busy
  result["wall_s"] = round(time.perf_counter() - t, 1)
  print("RESULT " + json.dumps(result), flush=True)
  return 0 if result["ok"] else 1


# ------------------------------------------------------------ orchestrator
def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Runner:
  """Starts measurement subprocesses and records their JSON lines."""

  def __init__(self, args, workdir):
    self.args = args
    self.workdir = workdir
    self.records = []
    self._count = 0

  def _command(self, spec):
    return [sys.executable, "-m", CLI, "--_worker", json.dumps(spec)]

  def _env(self, extra=None):
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["KERAS_BACKEND"] = self.args.backend
    env["PYTHONPATH"] = common.REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra or {})
    return env

  def start(self, spec, env=None):
    self._count += 1
    spec = dict(spec, id=self._count)
    log = os.path.join(self.workdir, f"worker-{self._count}-{spec['kind']}")
    out = open(log + ".log", "w")
    niceness = int(spec.get("nice") or 0)
    proc = subprocess.Popen(self._command(spec), stdout=out,
                            stderr=subprocess.STDOUT, env=self._env(env),
                            cwd=common.REPO_ROOT,
                            preexec_fn=(lambda: os.nice(niceness))
                            if niceness else None)
    return {"spec": spec, "proc": proc, "log": log + ".log", "file": out,
            "start": time.time(), "load_start": os.getloadavg()[0]}

  def finish(self, job, timeout):
    """Waits (bounded) for a started job; returns its measurement record."""
    remaining = max(1.0, timeout - (time.time() - job["start"]))
    try:
      job["proc"].wait(timeout=remaining)
    except subprocess.TimeoutExpired:
      job["proc"].kill()
      job["proc"].wait()
    job["file"].close()
    return self._record(job, timeout)

  def _record(self, job, timeout):
    spec = job["spec"]
    with open(job["log"]) as f:
      text = f.read()
    lines = [l for l in text.splitlines() if l.startswith("RESULT ")]
    if lines:
      result = json.loads(lines[-1][len("RESULT "):])
    else:
      result = {"ok": False,
                "error": (f"no result (exit code {job['proc'].returncode}, "
                          f"timeout {timeout} s): " + text[-1500:])}
    if self._sync_dir(spec):  # A failed party must not hold up the others.
      open(common.ready_file(spec), "w").close()
    kind = spec["kind"]
    record = {
        "measure": kind.split("_")[1], "impl": spec["impl"],
        "backend": spec["backend"], "config": spec["config"],
        "image_size": spec["model"]["image_size"],
        "backbone_depth": spec["model"]["backbone_depth"],
        "batch_size": spec["batch_size"], "precision": spec["precision"],
        "date": common.now(), "machine_cores": os.cpu_count(),
        "load_avg_1m_start": round(job["load_start"], 2),
        "load_avg_1m_end": round(os.getloadavg()[0], 2),
    }
    for key in ("strategy", "threads", "round", "worker_index",
                "num_workers", "torch_variant"):
      if key in spec:
        record[key] = spec[key]
    if spec.get("levers"):
      record["levers"] = list(spec["levers"])
    if spec.get("model_overrides"):
      record["model_overrides"] = dict(spec["model_overrides"])
    if record["measure"] == "infer":
      record["infer_scores"] = spec.get("infer_scores", "realistic")
    record.update(result)
    self.emit(record)
    return record

  @staticmethod
  def _sync_dir(spec):
    return spec.get("sync_dir")

  def run(self, spec, timeout, env=None):
    return self.finish(self.start(spec, env), timeout)

  def run_parallel(self, specs, timeout):
    """All specs at once (compile in parallel, timed one at a time)."""
    sync_dir = tempfile.mkdtemp(prefix="sync-", dir=self.workdir)
    barrier = min(self.args.barrier_timeout or timeout, timeout)
    main = sum(1 for s in specs if not s.get("extra"))
    specs = [dict(s, sync_dir=sync_dir, num_main_parties=main,
                  barrier_timeout_s=barrier) for s in specs]
    jobs = [self.start(s) for s in specs]
    pending, records = list(jobs), {}
    while pending:
      for job in list(pending):
        if job["proc"].poll() is not None or (
            time.time() - job["start"] > timeout):
          records[id(job)] = self.finish(job, timeout)
          pending.remove(job)
      time.sleep(0.5)
    return [records[id(j)] for j in jobs]

  def emit(self, record):
    self.records.append(record)
    print(json.dumps(record), flush=True)
    if self.args.output:
      tmp = self.args.output + ".tmp"
      with open(tmp, "w") as f:
        for r in self.records:
          f.write(json.dumps(r) + "\n")
      os.replace(tmp, self.args.output)


def base_spec(args, kwargs, config_name, prior_path, records=None):
  return {
      "peak_tflops": getattr(args, "peak_tflops", None),
      "levers": list(getattr(args, "lever", None) or []),
      "backend": args.backend, "config": config_name, "model": kwargs,
      "batch_size": args.batch_size, "precision": args.precision,
      "steps": args.steps, "warmup": args.warmup,
      "infer_steps": args.infer_steps, "num_batches": args.num_batches,
      "prior_path": prior_path, "records": records,
      "threads": args.threads, "clip": args.clip, "nesterov": args.nesterov,
      "infer_scores": args.infer_scores,
      "profile_dir": os.path.abspath(args.profile_dir) if args.profile_dir
                     else None,
  }


def _ok(record, key):
  return record is not None and record.get("ok") and record.get(key)


def _ratio(a, b):
  return round(a / b, 4) if a and b else None


def run_tensorflow(args, runner, base):
  """Ours (and the port with --peer), alternating, `--rounds` times."""
  impls = ["ours", "peer"] if args.peer else ["ours"]
  results = {(i, m): [] for i in impls for m in ("train", "infer")}
  measures = [m for m in ("train", "infer")
              if not (m == "train" and args.skip_train) and
              not (m == "infer" and args.skip_infer)]
  for r in range(args.rounds):
    for measure in measures:
      for impl in impls:
        spec = dict(base, kind=f"{impl}_{measure}", impl=impl, round=r)
        if impl == "peer":
          spec["precision"] = "float32"  # The port runs in float32 on CPU.
        results[(impl, measure)].append(runner.run(spec, args.timeout))
  summary = {"summary": True, "backend": "tensorflow",
             "config": base["config"], "image_size": base["model"]
             ["image_size"], "batch_size": base["batch_size"],
             "precision_ours": args.precision,
             "infer_scores": args.infer_scores, "date": common.now()}

  def med(impl, measure, key):
    values = [r[key] for r in results[(impl, measure)] if _ok(r, key)]
    return common.median(values)

  for impl in impls:
    summary[f"{impl}_train_step_s"] = med(impl, "train", "median_step_s")
    summary[f"{impl}_first_step_s"] = med(impl, "train", "first_step_s")
    summary[f"{impl}_infer_step_s"] = med(impl, "infer", "median_step_s")
    peaks = {m: [r["peak_rss_gib"] for r in results[(impl, m)]
                 if r.get("peak_rss_gib")] for m in ("train", "infer")}
    summary[f"{impl}_train_peak_gib"] = max(peaks["train"], default=None)
    summary[f"{impl}_infer_peak_gib"] = max(peaks["infer"], default=None)
    summary[f"{impl}_peak_gib"] = max(peaks["train"] + peaks["infer"],
                                      default=None)
  if args.peer:
    from official_shapemask.weights import legacy_shapemask
    summary["train_ratio"] = _ratio(summary["ours_train_step_s"],
                                    summary["peer_train_step_s"])
    summary["infer_ratio"] = _ratio(summary["ours_infer_step_s"],
                                    summary["peer_infer_step_s"])
    summary["peak_ratio"] = _ratio(summary["ours_peak_gib"],
                                   summary["peer_peak_gib"])
    summary["targets"] = {
        "train_ratio<=0.8": _le(summary["train_ratio"], 0.8),
        "infer_ratio<=0.3": _le(summary["infer_ratio"], 0.3),
        "ours_peak<peer_peak": _le(summary["peak_ratio"], 0.999999),
    }
    summary["not_equal"] = list(legacy_shapemask.UNEQUAL_SETTINGS)
  return summary


def _le(value, bound):
  return None if value is None else bool(value <= bound)


def run_workers(args, runner, base):
  """One process vs `--workers` MultiWorkerMirrored processes (loopback)."""
  n = args.workers
  threads = args.threads or max(1, (os.cpu_count() or 1) // n)
  base = dict(base, threads=threads, impl="ours")
  single = runner.run(dict(base, kind="ours_train", strategy="one_device",
                           num_workers=1), args.timeout)
  ports = [_free_port() for _ in range(n)]
  cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
  jobs = []
  for i in range(n):
    tf_config = json.dumps({"cluster": cluster,
                            "task": {"type": "worker", "index": i}})
    spec = dict(base, kind="ours_train", strategy="multi_worker",
                num_workers=n, worker_index=i,
                collective_timeout_s=args.timeout)
    jobs.append(runner.start(spec, env={"TF_CONFIG": tf_config}))
  multi = [runner.finish(job, args.timeout) for job in jobs]
  one = single.get("images_per_s") if single.get("ok") else None
  # Steps are synchronous: every worker sees the global throughput.
  many = [r.get("images_per_s") for r in multi if r.get("ok")]
  many = min(many) if len(many) == n else None
  return {
      "summary": True, "backend": "tensorflow", "config": base["config"],
      "measure": "scaling", "num_workers": n, "threads_per_process": threads,
      "per_replica_batch": base["batch_size"], "date": common.now(),
      "single_images_per_s": one, "multi_images_per_s": many,
      "speedup": _ratio(many, one),
      "efficiency": _ratio(many, n * one) if one and many else None,
      "single_step_s": single.get("median_step_s"),
      "multi_step_s": common.median([r["median_step_s"] for r in multi
                               if _ok(r, "median_step_s")]),
  }


def _value(text):
  for kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      pass
  return {"true": True, "false": False}.get(text.lower(), text)


def parse_variants(text):
  """`--variant` values -> [{measure, levers, overrides, batch_size}].

  Syntax: ``[train:|infer:]PART[+PART]@BATCH`` (default train); a PART is a
  lever of tools/bench/cost_analysis.py or a `build_shapemask_model`
  setting ``name=value`` (e.g. ``infer:pre_nms_num_boxes=1000@1``).
  """
  from official_shapemask.modeling import factory
  from tools.bench import cost_analysis
  import inspect
  settings = inspect.signature(factory.build_shapemask_model).parameters
  out = []
  for item in text or []:
    measure, colon, rest = item.partition(":")
    if not colon:
      measure, rest = "train", item
    parts, sep, batch = rest.partition("@")
    names = [n for n in parts.split("+") if n]
    levers = [n for n in names if "=" not in n]
    overrides = dict(n.split("=", 1) for n in names if "=" in n)
    bad = [n for n in levers if n not in cost_analysis.LEVERS] + [
        k for k in overrides if k not in settings]
    if (measure not in ("train", "infer") or not sep or not batch.isdigit()
        or not names or bad):
      raise ValueError(
          f"--variant {item!r}: expected [train:|infer:]PART[+PART]@BATCH, "
          f"a PART being a lever ({', '.join(sorted(cost_analysis.LEVERS))}) "
          f"or a build_shapemask_model setting name=value")
    out.append({"measure": measure, "levers": levers,
                "overrides": {k: _value(v) for k, v in overrides.items()},
                "batch_size": int(batch)})
  return out


def _label(record):
  """`ours`, `ours[bn_float32_io+bn_matmul_sums]`, `torchvision[compile]`."""
  extra = list(record.get("levers") or [])
  extra += [f"{k}={v}" for k, v in (record.get("model_overrides") or
                                    {}).items()]
  if record.get("torch_variant") and record["torch_variant"] != "eager":
    extra = [record["torch_variant"]]
  return record["impl"] + (f"[{'+'.join(extra)}]" if extra else "")


def run_jax(args, runner, base):
  """Our model under JAX (and torchvision with --peer).

  `--skip_train` leaves out every training measurement (ours, the
  `--variant`s and the peer's), `--skip_infer` the inference ones.
  """
  specs = []
  if not args.skip_train:
    for b in args.batch_sizes:
      specs.append(dict(base, kind="jax_train", impl="ours", batch_size=b))
  if not args.skip_infer:
    for b in _infer_batches(args):
      specs.append(dict(base, kind="jax_infer", impl="ours", batch_size=b))
  # The A/B variants are extras: with --parallel they compile at a lower CPU
  # priority than the product's measurements.
  for variant in parse_variants(getattr(args, "variant", None)):
    if getattr(args, f"skip_{variant['measure']}"):
      continue
    specs.append(dict(
        base, kind=f"jax_{variant['measure']}", impl="ours",
        batch_size=variant["batch_size"],
        levers=list(base.get("levers") or []) + variant["levers"],
        model=dict(base["model"], **variant["overrides"]),
        model_overrides=variant["overrides"], nice=10, extra=True))
  if args.peer and not args.skip_train:
    variants = getattr(args, "torch_variants", None) or ["eager"]
    for item in variants:
      variant, _, batch = item.partition("@")
      batches = ([int(batch)] if batch else
                 args.torch_batch_sizes or args.batch_sizes)
      for b in batches:
        specs.append(dict(base, kind="torch_train", impl="torchvision",
                          backend="torch", batch_size=b,
                          torch_variant=variant, levers=[],
                          nice=10 if "compile" in variant else 0,
                          extra=variant != "eager"))
  if args.parallel:
    # The peer's eager PyTorch steps are sensitive to host load: they run
    # first, alone; then ours (and the peer's torch.compile variants, whose
    # compilation is CPU work too) compile together and take turns on the
    # device, the main measurements as soon as they are all compiled, the
    # extras (A/B variants) when they are. The whole stays within --timeout.
    start = time.time()
    alone = [s for s in specs if s["kind"] == "torch_train" and
             "compile" not in s["torch_variant"]]
    records = [runner.run(s, args.timeout) for s in alone]
    together = [s for s in specs if not any(s is a for a in alone)]
    left = max(60, int(args.timeout - (time.time() - start)))
    if together:
      records += runner.run_parallel(together, left)
  else:
    records = [runner.run(s, args.timeout) for s in specs]
  summary = {"summary": True, "backend": "jax", "config": base["config"],
             "image_size": base["model"]["image_size"],
             "precision": args.precision, "date": common.now()}
  if base.get("peak_tflops"):
    summary["peak_tflops"] = base["peak_tflops"]
  for r in records:
    if not r.get("ok"):
      continue
    label = _label(r)
    if r["measure"] == "train":
      summary[f"{label}_train_images_per_s_b{r['batch_size']}"] = (
          r["images_per_s"])
    else:
      summary[f"{label}_infer_ms_per_image_b{r['batch_size']}"] = (
          r["ms_per_image"])
    if r.get("mfu") is not None:
      summary[f"{label}_{r['measure']}_mfu_b{r['batch_size']}"] = r["mfu"]
  summary["failed"] = [f"{_label(r)} {r['measure']} b{r['batch_size']}: "
                       f"{r.get('error', '')[:300]}" for r in records
                       if not r.get("ok")]
  return summary


def _infer_batches(args):
  """`--infer_batch_sizes` (comma-separated) or `--infer_batch_size`."""
  text = getattr(args, "infer_batch_sizes", None)
  if text:
    return [int(b) for b in str(text).split(",") if b]
  return [args.infer_batch_size]
