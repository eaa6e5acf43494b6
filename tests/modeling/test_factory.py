"""build_shapemask_model passes its backbone settings to the ResNet."""
from official_shapemask.modeling import factory

SMALL = dict(num_classes=3, num_clusters=2, image_size=64, backbone_depth=10,
             backbone_width_multiplier=0.25, min_level=3, max_level=5,
             fpn_num_filters=16, head_num_convs=1, head_num_filters=16,
             num_downsample_channels=8, mask_num_convs=1, mask_num_filters=8,
             pre_nms_num_boxes=100)


def test_backbone_stem_pool_padding_reaches_the_resnet():
  model = factory.build_shapemask_model(
      backbone_stem_pool_padding="symmetric", **SMALL)
  assert model.backbone.get_config()["stem_pool_padding"] == "symmetric"
  default = factory.build_shapemask_model(**SMALL)
  assert default.backbone.get_config()["stem_pool_padding"] == "same"
