"""Model supply: pinned sources, conversions to ONNX, the model manifest and parity checks."""
