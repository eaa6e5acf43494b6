"""ShapeMask instance segmentation in Keras 3.

Importing this package (or `official_shapemask.modeling`) never imports
TensorFlow: the model code uses `keras.ops` only, so it also runs under
`KERAS_BACKEND=jax`. The input pipeline, training loop and serving use
TensorFlow.
"""

__version__ = "0.1.0"
