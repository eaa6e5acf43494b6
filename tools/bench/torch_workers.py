"""PyTorch peer: torchvision's Mask R-CNN R50-FPN training step.

`spec["torch_variant"]` is what a PyTorch user would switch on, parts
joined by '+': `eager` (none), `channels_last` (the model's weights, hence
its convolutions, in NHWC), `compile` (`torch.compile` of the ResNet-FPN
backbone, whose shapes are static: most of the FLOPs) or `compile_all`
(`torch.compile` of the whole model, graph breaks at the data-dependent
RPN / RoI steps). Compiling variants run their first steps (the
compilation) before taking their turn on the device.

The step's FLOPs are counted once on an eager step with
`torch.utils.flop_counter.FlopCounterMode` (matrix products and
convolutions, forward and backward), so every result has TFLOP/s and MFU
against the run's peak like ours.
"""

import time

from tools.bench import common
from tools.bench import cost_analysis


def _notes(variant):
  base = common.TORCH_PEER_NOTES
  if variant == "eager":
    return base
  return base.replace("eager PyTorch (no torch.compile)",
                      f"variant {variant}")


def _count_flops(step):
  """FLOPs of one call of `step()` (None when the counter is missing)."""
  try:
    from torch.utils.flop_counter import FlopCounterMode
  except ImportError:
    return None
  counter = FlopCounterMode(display=False)
  with counter:
    step()
  return float(counter.get_total_flops())


def worker_torch_train(spec):
  import torch
  import torchvision
  size, batch = int(spec["model"]["image_size"]), spec["batch_size"]
  variant = spec.get("torch_variant", "eager")
  parts = set(variant.split("+"))
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  torch.manual_seed(0)
  t = time.perf_counter()
  model = torchvision.models.detection.maskrcnn_resnet50_fpn(
      weights=None, weights_backbone=None, num_classes=91, min_size=size,
      max_size=size).to(device).train()
  if "channels_last" in parts:
    model = model.to(memory_format=torch.channels_last)
  optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
  build_s = time.perf_counter() - t
  gen = torch.Generator().manual_seed(0)
  images = [torch.randn(3, size, size, generator=gen).to(device)
            for _ in range(batch)]
  targets = []
  for _ in range(batch):
    n = 8
    xy = torch.rand(n, 2, generator=gen) * 0.6 * size
    wh = (0.1 + 0.3 * torch.rand(n, 2, generator=gen)) * size
    boxes = torch.cat([xy, xy + wh], 1)
    masks = torch.zeros(n, size, size, dtype=torch.uint8)
    for i, (x0, y0, x1, y1) in enumerate(boxes.round().int().tolist()):
      masks[i, y0:y1, x0:x1] = 1
    targets.append({"boxes": boxes.to(device),
                    "labels": torch.randint(1, 91, (n,), generator=gen).to(
                        device),
                    "masks": masks.to(device)})
  use_bf16 = spec["precision"] == "mixed_bfloat16"
  box = {}

  def step():
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
      losses = model(images, targets)
      loss = sum(losses.values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    box["loss"] = float(loss)  # Synchronises.

  # FLOPs of one eager step (before compiling: the counter sees aten ops).
  step_flops = _count_flops(step)
  compile_s = None
  if "compile" in parts or "compile_all" in parts:
    if "compile_all" in parts:
      model.forward = torch.compile(model.forward)
    else:
      model.backbone = torch.compile(model.backbone)
    t = time.perf_counter()
    for _ in range(3):  # Compilation (and recompiles), before our turn.
      step()
    compile_s = time.perf_counter() - t
  with common.timing_turn(spec):
    t = time.perf_counter()
    step()
    first = time.perf_counter() - t
    times = common.timed_steps(step, spec["warmup"], spec["steps"])
  median = common.median(times)
  peak = (round(torch.cuda.max_memory_allocated() / 2**30, 3)
          if device.type == "cuda" else None)
  result = {
      "build_s": round(build_s, 2), "first_step_s": round(first, 3),
      "compile_s": round(compile_s, 2) if compile_s is not None else None,
      "median_step_s": round(median, 4),
      "images_per_s": round(batch / median, 2),
      "step_times_s": [round(x, 4) for x in times],
      "total_loss": round(box["loss"], 4), "device": str(device),
      "device_peak_gib": peak, "torch": torch.__version__,
      "torchvision": torchvision.__version__, "torch_variant": variant,
      "notes": _notes(variant),
      "step_flops": step_flops,
      "flops_source": "torch.utils.flop_counter (one eager step)"
                      if step_flops else None,
  }
  result.update(cost_analysis.mfu_fields(step_flops, median,
                                         spec.get("peak_tflops"), batch))
  return result
