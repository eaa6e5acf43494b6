"""A tiny detector (ResNet-10 x0.25, 3 levels, 32 filters) for backend tests.

Imported both by the tests and by their subprocesses (any Keras backend).
"""
import keras

from official_shapemask.modeling.backbones.resnet import ResNet
from official_shapemask.modeling.decoders.fpn import FPN
from official_shapemask.modeling.heads.retinanet_head import RetinaNetHead
from official_shapemask.modeling.layers.detection_generator import (
    DetectionGenerator)


def build_detector(size, num_classes, batch_size=2):
  """Functional model images -> detections + raw head outputs.

  Returns:
    (model, [backbone, fpn, head], generator). The middle list holds the
    layers with weights, in a fixed order for exchanging weights.
  """
  backbone = ResNet(depth=10, width_multiplier=0.25)
  fpn = FPN(min_level=3, max_level=5, num_filters=32)
  head = RetinaNetHead(min_level=3, max_level=5, num_classes=num_classes,
                       num_convs=2, num_filters=32)
  generator = DetectionGenerator((size, size), min_level=3, max_level=5,
                                 max_num_detections=20)
  images = keras.Input((size, size, 3), batch_size=batch_size)
  cls, box = head(fpn(backbone(images)))
  outputs = dict(generator(cls, box), cls_outputs=cls, box_outputs=box)
  return keras.Model(images, outputs), [backbone, fpn, head], generator
