"""tools/bench/cost_analysis.py and tools/bench/hlo_census.py.

The census reader on a small hand-written HLO module (FLOPs from shapes,
dtypes, fusion bodies not counted as memory writes, model regions from the
metadata), then the command line on the micro model under JAX: the
product's train and predict steps lowered and compiled on the CPU, FLOPs
that scale with the batch, the memory analysis, the convolutions found in
the census, and a lever that changes the dtypes the census sees.
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from tools.bench import hlo_census

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]

_HLO = """
HloModule jit__step

%fused_computation (p.0: f32[2,8,8,4]) -> f32[2,8,8,4] {
  %p.0 = f32[2,8,8,4]{3,2,1,0} parameter(0)
  ROOT %multiply.1 = f32[2,8,8,4]{3,2,1,0} multiply(%p.0, %p.0), metadata={op_name="jit(_step)/jvp(shapemask)/res_net/stem/bn/mul"}
}

ENTRY %main (images: bf16[2,16,16,3], kernel: bf16[3,3,3,4], w: f32[4,5]) -> f32[2,5] {
  %images = bf16[2,16,16,3]{3,2,1,0} parameter(0)
  %kernel = bf16[3,3,3,4]{3,2,1,0} parameter(1)
  %conv = bf16[2,8,8,4]{3,2,1,0} convolution(%images, %kernel), window={size=3x3 stride=2x2 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, metadata={op_name="jit(_step)/jvp(shapemask)/res_net/stem/conv/conv_general_dilated"}
  %up = f32[2,8,8,4]{3,2,1,0} convert(%conv), metadata={op_name="jit(_step)/jvp(shapemask)/res_net/stem/bn/convert_element_type"}
  %sq = f32[2,8,8,4]{3,2,1,0} fusion(%up), kind=kLoop, calls=%fused_computation
  %pooled = f32[2,4]{1,0} reduce(%sq, %zero), dimensions={1,2}, to_apply=%add
  %w = f32[4,5]{1,0} parameter(2)
  ROOT %logits = f32[2,5]{1,0} dot(%pooled, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(_step)/transpose(jvp(shapemask))/retina_net_head/dot_general"}
}
"""


def test_census_reads_flops_dtypes_writes_and_regions():
  out = hlo_census.analyze(_HLO)
  conv = out["census"]["convolution"]["bf16,bf16->bf16"]
  # 2 * output elements (2*8*8*4) * kernel elements per output (3*3*3).
  assert conv == {"count": 1, "gflop": round(2 * 512 * 27 / 1e9, 3),
                  "operand_bytes": 2 * (2 * 16 * 16 * 3 + 27 * 4)}
  dot = out["census"]["dot"]["f32,f32->f32"]
  assert dot["count"] == 1 and dot["operand_bytes"] == 4 * (8 + 20)
  assert out["matrix_gflop"] == pytest.approx((2 * 512 * 27 + 2 * 10 * 4)
                                              / 1e9, abs=1e-3)
  # Written: the conv (bf16), convert, fusion, reduce, dot (f32); the fusion
  # body's multiply and the parameters are not separate writes.
  assert out["written_bytes_by_dtype"] == {
      "f32": 4 * (512 + 512 + 8 + 10), "bf16": 2 * 512}
  assert out["forward_conv_gflop_by_output_channels"] == {
      "4": conv["gflop"]}
  regions = out["regions"]
  assert "res_net forward" in regions and (
      "retina_net_head backward" in regions)
  assert hlo_census.region_of("jit(_step)/jvp()/mul") == ("(losses)",
                                                          "forward")
  assert hlo_census.region_of("jit(_step)/sgd/mul") == ("sgd", "forward")
  assert hlo_census.region_of("jit(_step)/max") == ("(step)", "forward")


def test_loops_and_sorts_are_listed():
  text = """
ENTRY %main (s: f32[2,90,300]) -> s32[2,10] {
  %s = f32[2,90,300]{2,1,0} parameter(0)
  %topk = (f32[2,90,50]{2,1,0}, s32[2,90,50]{2,1,0}) custom-call(%s), custom_call_target="TopK", metadata={op_name="jit(_predict)/shapemask/detection_generator/top_k"}
  %t = (s32[], f32[2,90,300]{2,1,0}, s32[2,10]{1,0}, s32[2,10]{1,0}, pred[2,10]{1,0}, /*index=5*/s32[2,10]{1,0}) tuple(%a, %s, %b, %c, %d, %e)
  %w = (s32[], f32[2,90,300]{2,1,0}, s32[2,10]{1,0}, s32[2,10]{1,0}, pred[2,10]{1,0}, /*index=5*/s32[2,10]{1,0}) while(%t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"10"}}, metadata={op_name="jit(_predict)/shapemask/detection_generator/while"}
  %w2 = (s32[], pred[]) while(%t2), condition=%cond2, body=%body2
  %sorted = f32[2,300]{1,0} sort(%x), dimensions={1}, to_apply=%lt
  %tk = (f32[2,90,50]{2,1,0}, s32[2,90,50]{2,1,0}) topk(%s), k=50, largest=true
  ROOT %r = s32[2,10]{1,0} get-tuple-element(%w), index=2
}
"""
  out = hlo_census.analyze(text)
  assert out["loops"] == [
      {"region": "detection_generator forward", "known_trip_count": 10},
      {"region": "(no metadata) forward", "known_trip_count": None}]
  assert out["sorts"][0] == {"op": "topk",
                             "region": "detection_generator forward",
                             "shape": [2, 90, 300], "elements": 54000}
  assert [s["op"] for s in out["sorts"]] == ["topk", "sort", "topk"]
  assert out["sorts"][2]["elements"] == 2 * 90 * 300


def test_custom_call_convolutions_are_counted():
  text = """
ENTRY %main (x: bf16[1,8,8,4], k: bf16[4,3,3,4]) -> bf16[1,8,8,4] {
  %x = bf16[1,8,8,4]{3,2,1,0} parameter(0)
  %k = bf16[4,3,3,4]{3,2,1,0} parameter(1)
  %cc = (bf16[1,8,8,4]{3,2,1,0}, u8[0]{0}) custom-call(%x, %k), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convForward"
  ROOT %gte = bf16[1,8,8,4]{3,2,1,0} get-tuple-element(%cc), index=0
}
"""
  census = hlo_census.analyze(text)["census"]
  assert census["convolution"]["bf16,bf16->bf16"]["count"] == 1
  assert census["convolution"]["bf16,bf16->bf16"]["gflop"] == round(
      2 * 256 * 36 / 1e9, 3)


def _tool(*args, timeout=1500):
  env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu",
             TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
  proc = subprocess.run(
      [sys.executable, "-m", "tools.bench.cost_analysis", "--config=micro",
       *args], capture_output=True, text=True, env=env, cwd=REPO_ROOT,
      timeout=timeout, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return [json.loads(l) for l in proc.stdout.splitlines()
          if l.startswith("{")], proc.stderr


def test_micro_train_and_predict_steps(tmp_path):
  out = tmp_path / "ca.jsonl"
  records, stderr = _tool("--precision=mixed_bfloat16", "--batch_size=1",
                          "--step=train,predict", f"--output={out}")
  assert [json.loads(l)["step"] for l in out.read_text().splitlines()] == [
      "train", "predict"]
  train, predict = records
  assert train["step_class"].endswith("jax_step.TrainStep")
  assert predict["step_class"].endswith("jax_step.PredictStep")
  for r in records:
    low, comp = r["lowered"], r["compiled"]
    assert low["flops"] > 0 and low["bytes_accessed"] > 0
    assert r["flops_per_image"] == low["flops"]
    # The program's convolutions run in bfloat16.
    convs = low["census"]["convolution"]
    assert convs["bf16,bf16->bf16"]["count"] > 10
    assert convs["bf16,bf16->bf16"]["gflop"] > 0
    assert comp["backend"] == "cpu" and comp["flops"] > 0
    assert comp["census"]["convolution"]  # Found after optimisation too.
    mem = comp["memory"]
    assert mem["temp"] > 0 and mem["argument"] > 0
    assert mem["peak_estimate"] == (mem["argument"] + mem["output"] -
                                    mem["alias"] + mem["temp"])
  # Training: the forward pass, and about twice its FLOPs backward.
  assert train["lowered"]["flops"] > predict["lowered"]["flops"]
  regions = train["lowered"]["regions"]
  assert any(k.startswith("res_net backward") for k in regions)
  # The batch norms' channel sums are reductions under JAX: no float32 dot.
  assert "f32,f32->f32" not in train["lowered"]["census"].get("dot", {})
  # The donated state aliases the outputs.
  assert train["compiled"]["memory"]["alias"] > 0
  assert "train b1 |" in stderr and "TFLOP" in stderr


def test_flops_scale_with_batch_and_levers_change_the_census():
  (b1,), _ = _tool("--batch_size=1", "--no_compile")
  (b2,), _ = _tool("--batch_size=2", "--no_compile")
  (former,), _ = _tool("--batch_size=2", "--no_compile",
                       "--lever=bn_float32_io", "--lever=bn_matmul_sums")
  assert "compiled" not in b1
  ratio = b2["lowered"]["flops"] / b1["lowered"]["flops"]
  assert 1.9 < ratio < 2.05, ratio
  assert b2["flops_per_image"] == pytest.approx(b1["flops_per_image"],
                                                rel=0.05)
  # The former batch norm: float32 matmul channel sums, more float32 written.
  assert former["levers"] == ["bn_float32_io", "bn_matmul_sums"]
  assert former["lowered"]["census"]["dot"]["f32,f32->f32"]["count"] > 0
  assert (former["lowered"]["written_bytes_by_dtype"]["f32"] >
          b2["lowered"]["written_bytes_by_dtype"]["f32"])
  # The same convolutions either way.
  assert (former["lowered"]["census"]["convolution"] ==
          b2["lowered"]["census"]["convolution"])
