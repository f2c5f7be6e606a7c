"""The capture side: frame sources, sampling, face detection, tracking and crop dispatch."""
