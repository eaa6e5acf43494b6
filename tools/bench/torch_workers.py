"""PyTorch peer: torchvision's Mask R-CNN R50-FPN training step."""

import time

from tools.bench import common

def worker_torch_train(spec):
  import torch
  import torchvision
  size, batch = int(spec["model"]["image_size"]), spec["batch_size"]
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  torch.manual_seed(0)
  t = time.perf_counter()
  model = torchvision.models.detection.maskrcnn_resnet50_fpn(
      weights=None, weights_backbone=None, num_classes=91, min_size=size,
      max_size=size).to(device).train()
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

  with common.timing_turn(spec):
    t = time.perf_counter()
    step()
    first = time.perf_counter() - t
    times = common.timed_steps(step, spec["warmup"], spec["steps"])
  median = common.median(times)
  peak = (round(torch.cuda.max_memory_allocated() / 2**30, 3)
          if device.type == "cuda" else None)
  return {
      "build_s": round(build_s, 2), "first_step_s": round(first, 3),
      "median_step_s": round(median, 4),
      "images_per_s": round(batch / median, 2),
      "step_times_s": [round(x, 4) for x in times],
      "total_loss": round(box["loss"], 4), "device": str(device),
      "device_peak_gib": peak, "torch": torch.__version__,
      "torchvision": torchvision.__version__, "notes": common.TORCH_PEER_NOTES,
  }
