"""onnxruntime sessions: provider selection, threading, and logging what really runs.

insightface depends on the CPU ``onnxruntime`` while the ``gpu`` extra installs
``onnxruntime-gpu``; both write the same module folder, so which build is in place is
only known at run time. Every session therefore logs ``get_providers()`` (what actually
runs), and asking for ``cuda`` when it is not available is an error rather than a
silent fall back to the CPU.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from kernel.errors import ConfigurationError

logger = logging.getLogger(__name__)


def select_providers(preference: str) -> list[str]:
    """Onnxruntime providers for a preference of ``auto``, ``cpu`` or ``cuda``."""
    import onnxruntime

    available = onnxruntime.get_available_providers()
    if preference == "cpu":
        return ["CPUExecutionProvider"]
    if preference == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise ConfigurationError(
                "execution_provider: 'cuda' was asked for, but this onnxruntime build offers "
                f"{available}; install the gpu extra (see docs/gpu.md)"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if preference != "auto":
        raise ConfigurationError(f"execution_provider: expected auto, cpu or cuda, got {preference!r}")
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def session_options(intra_op_threads: int) -> Any:
    """Session options with the configured thread count (0 = onnxruntime's choice)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    # Spinning threads burn a core while they wait for work; on small machines that core is
    # needed by the decoder thread (measured in docs/benchmarks.md).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if intra_op_threads:
        options.intra_op_num_threads = intra_op_threads
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


def create_session(model: Path | bytes, *, preference: str, intra_op_threads: int, label: str) -> Any:
    """Create an inference session and log which providers actually run it."""
    import onnxruntime

    source = str(model) if isinstance(model, Path) else model
    session = onnxruntime.InferenceSession(
        source,
        sess_options=session_options(intra_op_threads),
        providers=select_providers(preference),
    )
    log_providers(session, label)
    return session


def log_providers(session: Any, label: str) -> list[str]:
    """Log and return the providers a session really uses."""
    providers = list(session.get_providers())
    logger.info("%s runs on %s", label, ", ".join(providers))
    return providers
