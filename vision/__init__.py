"""The vision stages, shared by the meeting bot, the workers and training.

Frame sources (``sources``: recorded files; ``synthetic``: in-memory demo videos), face
detection (``detection``), alignment and head pose (``geometry``), face embeddings
(``recognition``), tracking (``tracking``) and stitching of segment tracks
(``stitching``); ``capture`` composes them into the one capture pipeline. These modules
import only the kernel (``capture`` also the other stages). docs/architecture.md shows the layers.
"""
