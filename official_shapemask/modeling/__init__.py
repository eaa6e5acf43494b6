"""ShapeMask model components (Keras 3, keras.ops only)."""
