"""Offline data preparation: files written once, before training.

COCO JSON + images -> sharded TFRecords (`coco_tfrecord`) and k-means shape
priors (`shape_priors`). The `tf.data` readers of those files are in
`dataloaders/`; nothing here is imported by them, nor by the model.
"""
