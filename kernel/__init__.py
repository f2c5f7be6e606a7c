"""The kernel: what every other package builds on, importing nothing of ours.

The typed objects that cross every stage (``types``), the settings (``settings``), the
store schema and its sessions (``store``, with the account and audit helpers that are
plain store access: ``accounts``, ``audit``), the errors (``errors``) and the choice of
onnxruntime execution provider (``runtime``). docs/architecture.md shows the layers.
"""
