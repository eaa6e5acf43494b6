"""The TF1 reference's variable names for the variables of our model.

The seed's code (tensorflow/tpu `models/official/detection`) builds ShapeMask
with `tf.layers` inside variable scopes, so its checkpoints are name-based.
`tf1_variables(model)` lists, for every variable of a `ShapeMaskModel` that
such a checkpoint can hold, the graph name the reference gives it:

| reference name | ours |
| --- | --- |
| `resnet{D}/conv2d[_i]/kernel`, `resnet{D}/batch_normalization[_i]/{gamma,beta,moving_mean,moving_variance}`; `i` counts the convolutions in creation order: stem, then per block the projection shortcut (first block of a group), conv1, conv2 (the strided 3x3), conv3; a batch norm has its convolution's index | `backbone.stem`, `backbone.groups[g][b].{shortcut, convs[k]}` `.conv` / `.bn` |
| `fpn/l{l}`, `fpn/post_hoc_d{l}`, `fpn/p{l}` (levels above C5), `fpn/p{l}-bn` | `decoder.lateral`, `post_hoc`, `coarse`, `norms` |
| `retinanet/class_net/class-{i}` (shared by the levels), `class-{i}-{l}` (batch norm per level), `class-predict`; `retinanet/box_net/box-...` likewise | `head.class_convs[i]`, `class_norms['i-l']`, `class_predict`, `box_...` |
| `prior_mask/dense` (Dense `[C, D]`), `prior_mask/dense_1` (shape-mode classifier) | `prior_head.shape_prior_fc` (1x1 conv `[1, 1, C, D]`), `shape_classifier` |
| `coarse_mask/dense` (Dense `[1, D]`), `coarse_mask/class-{i}`, `class-{i}-bn`, `class-predict` | `coarse_head.prior_fc` (1x1 conv), `convs[i]`, `norms[i]`, `class_predict` |
| `fine_mask/dense`, `class-{i}`, `class-{i}-bn`, `conv2d_transpose` (`[u, u, out, in]`, as Keras), `class-predict` | `fine_head.prob_fc`, `convs[i]`, `norms[i]`, `upsample`, `class_predict` |

Our fine head applies its upsampling and the class column as one fused
per-instance kernel at run time; the variables are the reference's two
layers unchanged, so they map one to one. The shape priors are no
variable of the reference (it reads `shape_prior_path` when it builds) and
have no name here. Per-level batch norms, biases and moving statistics are
all listed.

The names hold for the model built by `build_shapemask_model` at any depth
and width (the reference numbers anonymous layers the same way for basic
blocks: projection, conv1, conv2).
"""

import dataclasses
import re

from official_shapemask.modeling.backbones import resnet

# Variables whose shape follows the number of classes (and, for the prior
# classifier, of shape clusters): skipped, not failed, when it differs.
CLASS_DEPENDENT = (
    re.compile(r"^retinanet/class_net/class-predict/"),
    re.compile(r"^prior_mask/dense_1/"),
    re.compile(r"^(coarse|fine)_mask/class-predict/"),
)
_BN_VARIABLES = ("gamma", "beta", "moving_mean", "moving_variance")
_ROOT_CONV = re.compile(r"^conv2d(?:_(\d+))?/kernel$")


@dataclasses.dataclass(frozen=True)
class Tf1Variable:
  """One variable of ours and the reference's name for it.

  Attributes:
    name: the reference's full graph name, e.g. `resnet50/conv2d_3/kernel`.
    variable: our variable.
    module: our top-level model attribute holding it (`backbone`,
      `decoder`, `head`, `prior_head`, `coarse_head`, `fine_head`).
    dense_to_conv: the reference stores a Dense kernel `[i, o]`; ours is a
      1x1 convolution kernel `[1, 1, i, o]`.
  """
  name: str
  variable: object
  module: str
  dense_to_conv: bool = False

  @property
  def class_dependent(self):
    return any(p.match(self.name) for p in CLASS_DEPENDENT)


def backbone_scope(depth):
  """The reference's variable scope of a ResNet, e.g. `resnet101/`."""
  return f"resnet{depth}/"


def resnet_conv_count(depth):
  """Convolutions of the reference's ResNet of `depth` (stem included)."""
  block_type, blocks = resnet.RESNET_SPECS[depth]
  per_block = 3 if block_type == "bottleneck" else 2
  return 1 + per_block * sum(blocks) + len(blocks)


def depth_of_conv_count(count):
  """The ResNet depth with `count` convolutions, or None."""
  for depth in resnet.RESNET_SPECS:
    if resnet_conv_count(depth) == count:
      return depth
  return None


def root_conv_count(names, base=""):
  """How many `{base}conv2d[_i]/kernel` names `names` holds."""
  count = 0
  for name in names:
    if name.startswith(base) and _ROOT_CONV.match(name[len(base):]):
      count += 1
  return count


def _indexed(base, index):
  return base if index == 0 else f"{base}_{index}"


def _conv(name, layer, module, dense_to_conv=False):
  out = [Tf1Variable(f"{name}/kernel", layer.kernel, module, dense_to_conv)]
  if getattr(layer, "bias", None) is not None:
    out.append(Tf1Variable(f"{name}/bias", layer.bias, module))
  return out


def _norm(name, layer, module):
  return [Tf1Variable(f"{name}/{short}", getattr(layer, short), module)
          for short in _BN_VARIABLES]


def backbone_conv_norms(backbone):
  """Our conv + batch-norm layers in the reference's creation order.

  Stem, then per block the projection shortcut (first block of a group) and
  the block's convolutions. The TF1 code and the Model Garden port number
  their anonymous `conv2d[_i]` / `batch_normalization[_i]` layers in this
  order; both readers (`tf1_checkpoints`, `legacy_converter`) use this list.
  """
  order = [backbone.stem]
  for blocks in backbone.groups:
    for block in blocks:
      if block.shortcut is not None:
        order.append(block.shortcut)
      order.extend(block.convs)
  return order


def _backbone(backbone):
  scope = backbone_scope(backbone.get_config()["depth"])
  out = []
  for index, conv_norm in enumerate(backbone_conv_norms(backbone)):
    out += _conv(scope + _indexed("conv2d", index), conv_norm.conv, "backbone")
    out += _norm(scope + _indexed("batch_normalization", index), conv_norm.bn,
                 "backbone")
  return out


def _decoder(decoder):
  out = []
  for key, layer in decoder.lateral.items():
    out += _conv(f"fpn/l{key}", layer, "decoder")
  for key, layer in decoder.post_hoc.items():
    out += _conv(f"fpn/post_hoc_d{key}", layer, "decoder")
  for key, layer in decoder.coarse.items():
    out += _conv(f"fpn/p{key}", layer, "decoder")
  for key, layer in decoder.norms.items():
    out += _norm(f"fpn/p{key}-bn", layer, "decoder")
  return out


def _head(head):
  out = []
  for net, prefix, convs, norms, predict in (
      ("class_net", "class", head.class_convs, head.class_norms,
       head.class_predict),
      ("box_net", "box", head.box_convs, head.box_norms, head.box_predict)):
    scope = f"retinanet/{net}/{prefix}"
    for i, conv in enumerate(convs):
      out += _conv(f"{scope}-{i}", conv, "head")
    for key, norm in norms.items():
      out += _norm(f"{scope}-{key}", norm, "head")
    out += _conv(f"{scope}-predict", predict, "head")
  return out


def _mask_heads(model):
  prior = model.prior_head
  out = _conv("prior_mask/dense", prior.shape_prior_fc, "prior_head",
              dense_to_conv=True)
  out += _conv("prior_mask/dense_1", prior.shape_classifier, "prior_head")
  for scope, head, fc, module in (
      ("coarse_mask", model.coarse_head, model.coarse_head.prior_fc,
       "coarse_head"),
      ("fine_mask", model.fine_head, model.fine_head.prob_fc, "fine_head")):
    out += _conv(f"{scope}/dense", fc, module, dense_to_conv=True)
    for i, (conv, norm) in enumerate(zip(head.convs, head.norms)):
      out += _conv(f"{scope}/class-{i}", conv, module)
      out += _norm(f"{scope}/class-{i}-bn", norm, module)
    if getattr(head, "upsample", None) is not None:
      out += _conv(f"{scope}/conv2d_transpose", head.upsample, module)
    out += _conv(f"{scope}/class-predict", head.class_predict, module)
  return out


def tf1_variables(model):
  """Every variable of `model` a reference checkpoint holds, by TF1 name.

  Args:
    model: a built `ShapeMaskModel`.

  Returns:
    list of `Tf1Variable`, backbone first, in the reference's order.
  """
  return (_backbone(model.backbone) + _decoder(model.decoder) +
          _head(model.head) + _mask_heads(model))
