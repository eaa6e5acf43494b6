"""`gin/shapemask_r101.gin` and the scaling rows hold what the seed sets.

Reads the seed document (../shared/seed/000_33f90d029d487fdb.txt): the
`export` lines, the `main.py` training and evaluation commands (their
`--params_override`, with the variables substituted, parsed as the seed's
code parses it, as YAML) and the table of benchmark configurations. Every
`params_override` entry must map to an effective setting of ours after gin
parsing (`Experiment`, `build_shapemask_model`, the optimizer's schedule)
and hold the seed's value; every ShapeMask row of the table must be a
config (batch 64: `shapemask_r101.gin`, others
`benchmarks/shapemask_r101_b<batch>.gin`) with its batch, steps, warmup,
learning rates and decay steps. The README's table must name every
variable, flag and entry of the seed's commands. Nothing of the seed's
values is written here: a change of either side fails.
"""
import inspect
import pathlib
import re

import gin
import keras
import pytest
import yaml

from official_shapemask.modeling import factory
from official_shapemask.training import gin_utils
from official_shapemask.training import optimizers
from official_shapemask.training import settings

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
SEED = REPO_ROOT / ".." / "shared" / "seed" / "000_33f90d029d487fdb.txt"
GIN_DIR = REPO_ROOT / "gin"
# Settings a user gives (their data): bound here to the seed's values under
# the seed's variable names, which are our macro names.
DATA_MACROS = ("TRAIN_FILE_PATTERN", "EVAL_FILE_PATTERN", "VAL_JSON_FILE")


def _flatten(tree, prefix=""):
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = value
  return out


def _commands(lines):
  """The `python ... main.py` commands, continuation lines joined."""
  commands = []
  i = 0
  while i < len(lines):
    if lines[i].startswith("python ") and "main.py" in lines[i]:
      parts = [lines[i]]
      while parts[-1].rstrip().endswith("\\"):
        i += 1
        parts.append(lines[i])
      commands.append(" ".join(p.rstrip().rstrip("\\") for p in parts))
    i += 1
  return commands


def _table(lines, header_word):
  """Rows (lists of cells) of the table whose header holds `header_word`."""
  start = next(i for i, line in enumerate(lines) if header_word in line)
  rows = []
  for line in lines[start + 1:]:
    cells = line.split()
    if not cells:
      if rows:
        break
      continue
    if cells[0] not in ("ShapeMask", "Mask"):
      break
    rows.append(cells)
  return rows


@pytest.fixture(scope="module")
def seed():
  """The seed's variables, commands, flags and configuration table."""
  if not SEED.is_file():
    pytest.skip(f"seed document not found at {SEED}")
  text = SEED.read_text()
  lines = text.splitlines()
  env, comments = {}, {}
  for m in re.finditer(r"^export (\w+)=(\S*?);?[ \t]*(?:#(.*))?$", text,
                       re.M):
    env[m.group(1)] = m.group(2).strip("'\"")
    comments[m.group(1)] = m.group(3) or ""

  def substitute(s):
    for _ in range(5):  # Variables defined through others.
      s = re.sub(r"\$\{(\w+)\}", lambda v: env[v.group(1)], s)
    return s

  env = {name: substitute(value) for name, value in env.items()}
  commands = {}
  for command in _commands(lines):
    mode = re.search(r'--mode="?(\w+)"?', command).group(1)
    override = re.search(r'--params_override="([^"]*)"', command).group(1)
    commands[mode] = {
        "params": _flatten(yaml.safe_load(substitute(override))),
        "flags": re.findall(r"--(\w+)", command.split("--params_override")[0]),
        "variables": set(re.findall(r"\$\{(\w+)\}", command)),
    }
  # "Set to 0.1 of INIT_LR": the decayed rates of the table's rows.
  factors = [float(re.search(r"Set to ([\d.]+) of INIT_LR",
                             comments[name]).group(1))
             for name in ("FIRST_DECAY_LR", "SECOND_DECAY_LR")]
  header = next(line for line in lines if "Total Steps" in line)
  rows = [r for r in _table(lines, "Total Steps") if r[0] == "ShapeMask"]
  return {"env": env, "commands": commands, "factors": factors,
          "rows": rows, "header": header}


def _effective(name, bindings=()):
  """Our effective settings after gin parsing `name`, under the seed's keys."""
  with gin.unlock_config():
    gin.clear_config()
  gin_utils.parse_config([name], list(bindings))
  exp = settings.Settings("unused")
  defaults = {k: p.default for k, p in inspect.signature(
      factory.build_shapemask_model).parameters.items()}
  model = dict(defaults, **gin.get_bindings(factory.build_shapemask_model))
  schedule = keras.optimizers.schedules.deserialize(
      optimizers.build_momentum_optimizer().get_config()[
          "learning_rate"]).get_config()
  lr = "train.learning_rate."
  return {
      "train.iterations_per_loop": exp.steps_per_loop,
      "train.train_batch_size": exp.train_batch_size,
      "train.total_steps": exp.total_steps,
      lr + "total_steps": exp.total_steps,
      lr + "warmup_learning_rate": schedule["warmup_learning_rate"],
      lr + "warmup_steps": schedule["warmup_steps"],
      lr + "init_learning_rate": schedule["init_learning_rate"],
      lr + "learning_rate_levels": list(schedule["learning_rate_levels"]),
      lr + "learning_rate_steps": list(schedule["learning_rate_steps"]),
      "train.checkpoint.path": exp.init_checkpoint,
      "train.checkpoint.prefix": exp.init_checkpoint_prefix,
      "train.train_file_pattern": exp.train_file_pattern,
      "resnet.resnet_depth": model["backbone_depth"],
      "eval.val_json_file": exp.val_json_file,
      "eval.eval_file_pattern": exp.eval_file_pattern,
      "eval.eval_samples": exp.eval_samples,
      "shapemask_head.use_category_for_mask": model["use_category_for_mask"],
      "shapemask_head.shape_prior_path": model["shape_prior_path"],
      "shapemask_parser.output_size": [model["image_size"]] * 2,
      "retinanet_loss.focal_loss_alpha": model["focal_loss_alpha"],
      "retinanet_loss.huber_loss_delta": model["huber_loss_delta"],
  }


@pytest.fixture(autouse=True)
def _clean_gin():
  yield
  with gin.unlock_config():
    gin.clear_config()


def _same(ours, theirs):
  if isinstance(theirs, float) or (isinstance(theirs, list) and theirs and
                                   isinstance(theirs[0], float)):
    return ours == pytest.approx(theirs, rel=1e-9)
  return ours == theirs


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_r101_config_holds_every_value_of_the_seeds_command(seed, mode):
  command = seed["commands"][mode]
  data = [f"{name}='{seed['env'][name]}'" for name in DATA_MACROS]
  ours = _effective("shapemask_r101.gin", data)
  unmapped = sorted(set(command["params"]) - set(ours))
  assert not unmapped, f"params_override entries without a setting: {unmapped}"
  wrong = {key: (ours[key], value) for key, value in command["params"].items()
           if not _same(ours[key], value)}
  assert not wrong, wrong
  # (The checkpoint and priors are the config's own defaults: not bound.)


def test_the_seeds_command_covers_what_is_checked(seed):
  """The parse found the command's whole content (guards the parser)."""
  params = seed["commands"]["train"]["params"]
  assert len(params) >= 20
  assert {"train.checkpoint.path", "train.checkpoint.prefix",
          "shapemask_head.shape_prior_path", "eval.eval_samples",
          "train.learning_rate.learning_rate_steps"} <= set(params)
  assert len(seed["rows"]) >= 4
  assert all(len(row) == 8 for row in seed["rows"])


def _row_config(batch):
  if batch == 64:
    return "shapemask_r101.gin"
  return f"benchmarks/shapemask_r101_b{batch}.gin"


def test_every_scaling_row_is_a_config(seed):
  # Columns: Model, Batch Size, Number of Cores, Total Steps, Warmup Steps,
  # Initial Learning Rate, First Decay Step, Second Decay Step.
  assert re.sub(r"\s+", " ", seed["header"]).startswith(
      "Model Batch Size Number of Cores Total Steps Warmup Steps Initial "
      "Learning Rate First Decay Step Second Decay Step")
  warmup_lr = seed["commands"]["train"]["params"][
      "train.learning_rate.warmup_learning_rate"]
  data = [f"{name}='{seed['env'][name]}'" for name in DATA_MACROS]
  names = set()
  lr = "train.learning_rate."
  for row in seed["rows"]:
    batch, _, total, warmup = (int(x) for x in row[1:5])
    init_lr = float(row[5])
    decays = [int(x) for x in row[6:8]]
    name = _row_config(batch)
    names.add(name)
    assert (GIN_DIR / name).is_file(), f"no config for the batch {batch} row"
    ours = _effective(name, data)
    assert ours["train.train_batch_size"] == batch, name
    assert ours["train.total_steps"] == total, name
    assert ours[lr + "warmup_steps"] == warmup, name
    assert ours[lr + "warmup_learning_rate"] == pytest.approx(warmup_lr)
    assert ours[lr + "init_learning_rate"] == pytest.approx(init_lr), name
    assert ours[lr + "learning_rate_steps"] == decays, name
    assert ours[lr + "learning_rate_levels"] == pytest.approx(
        [f * init_lr for f in seed["factors"]]), name
    # The rest is the seed's R-101 run.
    for key in ("resnet.resnet_depth", "shapemask_parser.output_size",
                "train.checkpoint.path", "train.checkpoint.prefix",
                "train.iterations_per_loop"):
      assert ours[key] == seed["commands"]["train"]["params"][key], (name,
                                                                    key)
  benchmarks = {f"benchmarks/{p.name}"
                for p in (GIN_DIR / "benchmarks").glob("*.gin")}
  assert benchmarks <= names, benchmarks - names


def test_readme_maps_every_variable_flag_and_entry(seed):
  """The README's table names each part of the seed's commands."""
  readme = (REPO_ROOT / "README.md").read_text()
  start = readme.index("| Seed (`main.py`)")
  table = readme[start:readme.index("\n\n", start)]
  names = set()
  for command in seed["commands"].values():
    names |= set(command["params"]) | set(command["variables"])
    names |= {f"--{flag}" for flag in command["flags"]}
  missing = sorted(n for n in names if f"`{n}`" not in table)
  assert not missing, f"not in the README's seed table: {missing}"
