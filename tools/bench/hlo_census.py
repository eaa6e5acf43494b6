"""Reads XLA HLO text: convolution / dot census, bytes by dtype, regions.

Pure Python (no JAX): the input is the text of an HLO module, either the
lowered, unoptimised module (`jax.jit(f).lower(...).as_text("hlo")`: the
program's own ops and dtypes, the same for every backend) or a compiled one
(`compiled.as_text()`: after the backend's fusion and type passes).

- `census`: every convolution and dot (and convolution/matmul custom-calls,
  as XLA emits them for cuDNN, cuBLAS or oneDNN), grouped by operand and
  result dtype, with their count, FLOPs (2 x multiply-adds, from the
  shapes) and the bytes of their two operands (`operand_bytes`: what they
  read, and on a GPU what has to be in memory before they run, since XLA
  does not fuse elementwise producers into cuDNN/cuBLAS calls).
- `written_bytes_by_dtype`: the bytes of every materialised result, by
  element type: every op of a lowered module, the fusions and unfused ops
  of a compiled one (fusion bodies left out). A proxy for memory traffic and
  for how much of it is float32.
- `regions`: the same FLOPs and bytes per model part and pass, read from
  each op's metadata `op_name` (`jit(_step)/jvp(shapemask)/res_net/...` ->
  `res_net`, forward; `transpose(jvp(...))` -> backward). Needs metadata
  (`as_text(debug_info=True)` for a lowered module).
- `forward_conv_gflop_by_output_channels`: forward-pass convolution FLOPs
  by their number of output channels (e.g. the class predictor's
  ``A * num_classes`` = 819).
- `loops`: every `while` with the trip count XLA knows for it (None: the
  loop decides on the device whether to go on, which on a GPU means a
  device-to-host copy and a wait per iteration); `sorts`: every sort and
  top-k with its input shape.
"""

import collections
import re

DTYPE_BYTES = {
    "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2,
    "s32": 4, "u32": 4, "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4,
    "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1,
    "f8e4m3": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "f8e3m4": 1,
}
# Ops whose result is not new data in memory.
_NOT_WRITTEN = frozenset((
    "parameter", "constant", "tuple", "get-tuple-element", "bitcast",
    "after-all", "partition-id", "replica-id", "iota", "opt-barrier",
    "add-dependency", "domain"))
_CONV_TARGET = re.compile(r"conv", re.IGNORECASE)
_MATMUL_TARGET = re.compile(r"gemm|matmul|dot", re.IGNORECASE)

_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*\))?.*\{\s*$")
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*"  # name
    r"(\((?:[^()]|\([^()]*\))*?\)|[a-z0-9]+\[[0-9,]*\](?:\{[^}]*\})?)\s*"
    # ^ result type: an array, or a tuple (which may hold /*index=5*/ notes)
    r"([a-z][\w\-]*)\((.*)$")  # opcode(operands...), attributes
_ARRAY = re.compile(r"([a-z][a-z0-9]*)\[([0-9,]*)\]")
_OPERAND = re.compile(r"%?([\w.\-]+)")


def _array(type_text):
  """`bf16[8,64,64,256]{3,2,1,0}` -> ('bf16', (8, 64, 64, 256))."""
  m = _ARRAY.match(type_text)
  if not m:
    return None, None
  dims = tuple(int(d) for d in m.group(2).split(",") if d)
  return m.group(1), dims


def _product(dims):
  out = 1
  for d in dims:
    out *= d
  return out


def _split_operands(rest):
  """`a, b), window=...` -> (['a', 'b'], 'window=...')."""
  depth, i = 0, 0
  for i, ch in enumerate(rest):
    if ch in "({[":
      depth += 1
    elif ch in ")}]":
      if depth == 0:
        break
      depth -= 1
  inner, attrs = rest[:i], rest[i + 1:]
  names = []
  depth, start = 0, 0
  for j, ch in enumerate(inner + ","):
    if ch in "({[":
      depth += 1
    elif ch in ")}]":
      depth -= 1
    elif ch == "," and depth == 0:
      token = inner[start:j].strip()
      start = j + 1
      if token:
        # Newer HLO prints `f32[2,3]{1,0} %name`; keep the name.
        m = _OPERAND.match(token.split()[-1])
        names.append(m.group(1) if m else token)
  return names, attrs


def parse_module(text):
  """HLO text -> list of computations `{name, instructions, fusion_body}`.

  Each instruction: `{name, type, dtype, dims, opcode, operands, attrs,
  op_name}`; `fusion_body` marks computations called by a `fusion` op
  (their instructions are not separate memory writes).
  """
  computations, current = [], None
  called_by_fusion = set()
  for line in text.splitlines():
    stripped = line.strip()
    if not stripped or stripped.startswith("//"):
      continue
    if current is None or stripped.endswith("{") and "=" not in stripped.split(
        "(")[0]:
      m = _COMPUTATION.match(stripped)
      if m and stripped.endswith("{"):
        current = {"name": m.group(1), "instructions": []}
        computations.append(current)
        continue
    if stripped == "}":
      current = None
      continue
    if current is None:
      continue
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    name, type_text, opcode, rest = m.groups()
    operands, attrs = _split_operands(rest)
    dtype, dims = _array(type_text)
    op_name = re.search(r'op_name="([^"]*)"', attrs)
    current["instructions"].append({
        "name": name, "type": type_text, "dtype": dtype, "dims": dims,
        "opcode": opcode, "operands": operands, "attrs": attrs,
        "op_name": op_name.group(1) if op_name else ""})
    if opcode == "fusion":
      calls = re.search(r"calls=%?([\w.\-]+)", attrs)
      if calls:
        called_by_fusion.add(calls.group(1))
  roots = {}
  for comp in computations:
    comp["fusion_body"] = comp["name"] in called_by_fusion
    named = [i["op_name"] for i in comp["instructions"] if i["op_name"]]
    if named:
      roots[comp["name"]] = named[-1]
  # A fusion without metadata of its own takes its body's last named op's.
  for comp in computations:
    for inst in comp["instructions"]:
      if inst["opcode"] == "fusion" and not inst["op_name"]:
        calls = re.search(r"calls=%?([\w.\-]+)", inst["attrs"])
        if calls:
          inst["op_name"] = roots.get(calls.group(1), "")
  return computations


def _conv_flops(inst, shapes):
  """2 x output elements x (kernel elements per output feature)."""
  if len(inst["operands"]) < 2 or inst["dims"] is None:
    return 0.0
  kernel = shapes.get(inst["operands"][1])
  labels = re.search(r"dim_labels=[^_]*_([^-]*)->", inst["attrs"])
  if kernel is None or kernel[1] is None or not labels:
    return 0.0
  kernel_dims, kernel_labels = kernel[1], labels.group(1)
  if len(kernel_labels) != len(kernel_dims) or "o" not in kernel_labels:
    return 0.0
  per_output = _product(kernel_dims) / kernel_dims[kernel_labels.index("o")]
  groups = re.search(r"batch_group_count=(\d+)", inst["attrs"])
  if groups:  # Weight-gradient convolutions split the batch into groups.
    per_output /= int(groups.group(1))
  return 2.0 * _product(inst["dims"]) * per_output


def _dot_flops(inst, shapes):
  """2 x output elements x contracted size."""
  if not inst["operands"] or inst["dims"] is None:
    return 0.0
  lhs = shapes.get(inst["operands"][0])
  contracting = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}",
                          inst["attrs"])
  if lhs is None or lhs[1] is None or not contracting:
    return 0.0
  size = _product(lhs[1][int(d)] for d in contracting.group(1).split(",") if d)
  return 2.0 * _product(inst["dims"]) * size


def _kind(inst):
  """'convolution' / 'dot' / None for the matrix-unit ops."""
  if inst["opcode"] == "convolution":
    return "convolution"
  if inst["opcode"] == "dot":
    return "dot"
  if inst["opcode"] == "custom-call":
    target = re.search(r'custom_call_target="([^"]*)"', inst["attrs"])
    target = target.group(1) if target else ""
    if _CONV_TARGET.search(target):
      return "convolution"
    if _MATMUL_TARGET.search(target):
      return "dot"
  return None


def region_of(op_name):
  """`jit(_step)/transpose(jvp(shapemask))/res_net/...` -> ('res_net',
  'backward'); ops outside the model (loss, optimizer) keep their first
  path element."""
  if not op_name:
    return "(no metadata)", "forward"
  parts = op_name.split("/")
  if parts and parts[0].startswith("jit("):
    parts = parts[1:]
  backward = any(p.startswith("transpose(") for p in parts)
  names = []
  for p in parts:
    while "(" in p and p.endswith(")"):  # jvp(shapemask) -> shapemask
      p = p[p.index("(") + 1:-1]
    names.append(p)
  if names and names[0] == "shapemask" and len(names) > 1:
    names = names[1:]
  if len(names) <= 1:  # `jit(_step)/max`: the step's own ops.
    return "(step)", "backward" if backward else "forward"
  # `jvp()/mul`: traced under the gradient but outside the model's call
  # (compute_losses: the loss terms and the L2 penalty).
  region = names[0] or "(losses)"
  return region, "backward" if backward else "forward"


def analyze(text, top=12):
  """Census, bytes by dtype and regions of one HLO module's text."""
  computations = parse_module(text)
  census = collections.defaultdict(
      lambda: collections.defaultdict(lambda: [0, 0.0, 0.0]))
  written = collections.Counter()
  large_f32 = collections.Counter()
  regions = collections.defaultdict(lambda: [0.0, 0.0])
  loops, sorts = [], []
  by_channels = collections.Counter()
  for comp in computations:
    shapes = {i["name"]: (i["dtype"], i["dims"]) for i in comp["instructions"]}
    for inst in comp["instructions"]:
      if inst["opcode"] == "while":
        trips = re.search(r'known_trip_count[^0-9]*([0-9]+)', inst["attrs"])
        loops.append({"region": " ".join(region_of(inst["op_name"])),
                      "known_trip_count": int(trips.group(1)) if trips
                                          else None})
      if inst["opcode"] in ("sort", "topk") or (
          inst["opcode"] == "custom-call" and
          re.search(r'custom_call_target="[^"]*(?i:topk|sort)', inst["attrs"])):
        first = shapes.get(inst["operands"][0]) if inst["operands"] else None
        dims = first[1] if first and first[1] else ()
        sorts.append({"op": "sort" if inst["opcode"] == "sort" else "topk",
                      "region": " ".join(region_of(inst["op_name"])),
                      "shape": list(dims), "elements": _product(dims)})
      kind = _kind(inst)
      flops = 0.0
      if kind is not None:
        operand_dtypes = [shapes.get(o, (None, None))[0] or "?"
                          for o in inst["operands"][:2]]
        if inst["opcode"] == "custom-call" and inst["type"].startswith("("):
          result = _ARRAY.search(inst["type"])
          result_dtype = result.group(1) if result else "?"
        else:
          result_dtype = inst["dtype"] or "?"
        key = ",".join(operand_dtypes) + "->" + result_dtype
        if inst["opcode"] == "custom-call":
          dims = _ARRAY.search(inst["type"])
          inst = dict(inst, dims=tuple(
              int(d) for d in dims.group(2).split(",") if d) if dims else None)
        flops = (_conv_flops(inst, shapes) if kind == "convolution" else
                 _dot_flops(inst, shapes))
        entry = census[kind][key]
        entry[0] += 1
        entry[1] += flops
        for operand in inst["operands"][:2]:
          dtype, dims = shapes.get(operand, (None, None))
          if dtype and dims is not None:
            entry[2] += DTYPE_BYTES.get(dtype, 4) * _product(dims)
        out_labels = re.search(r"dim_labels=[^-]*->(\w+)", inst["attrs"])
        if (kind == "convolution" and out_labels and inst["dims"] and
            region_of(inst["op_name"])[1] == "forward" and
            "f" in out_labels.group(1) and
            len(out_labels.group(1)) == len(inst["dims"])):
          channels = inst["dims"][out_labels.group(1).index("f")]
          by_channels[channels] += flops
      region = region_of(inst["op_name"])
      regions[region][0] += flops
      if comp["fusion_body"] or inst["opcode"] in _NOT_WRITTEN:
        continue
      for dtype, dims in _ARRAY.findall(inst["type"]):
        nbytes = DTYPE_BYTES.get(dtype, 4) * _product(
            int(d) for d in dims.split(",") if d)
        written[dtype] += nbytes
        regions[region][1] += nbytes
        if dtype == "f32" and nbytes >= 2**20:
          large_f32[region] += nbytes
  out = {
      "census": {
          kind: {key: {"count": n, "gflop": round(f / 1e9, 3),
                       "operand_bytes": int(b)}
                 for key, (n, f, b) in sorted(groups.items(),
                                              key=lambda kv: -kv[1][1])}
          for kind, groups in sorted(census.items())},
      "written_bytes_by_dtype": {
          k: int(v) for k, v in written.most_common() if v},
      "f32_tensors_of_1mib_or_more_bytes_by_region": {
          f"{r[0]} {r[1]}": int(v) for r, v in large_f32.most_common(top)},
  }
  out["forward_conv_gflop_by_output_channels"] = {
      str(c): round(f / 1e9, 3) for c, f in by_channels.most_common(top)}
  out["loops"] = loops
  out["sorts"] = sorts
  total_flops = sum(f for groups in census.values()
                    for _, f, _ in groups.values())
  out["matrix_gflop"] = round(total_flops / 1e9, 3)
  by_flops = sorted(regions.items(), key=lambda kv: (-kv[1][0], -kv[1][1]))
  out["regions"] = {
      f"{r[0]} {r[1]}": {"gflop": round(v[0] / 1e9, 3),
                         "written_gb": round(v[1] / 1e9, 3)}
      for r, v in by_flops[:top] if v[0] or v[1]}
  return out
