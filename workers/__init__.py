"""The inference side: ONNX runners, the pure crop-analysis function, persistence and dispatchers."""
