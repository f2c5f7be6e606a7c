"""The execution provider a session reports matches the configuration; a missing GPU is an error, not a fallback."""

from pathlib import Path

import onnxruntime
import pytest

from kernel.errors import ConfigurationError
from kernel.runtime import select_providers
from workers.runners import EngagementRunner


def test_cpu_configuration_runs_on_the_cpu_provider(default_models: Path) -> None:
    runner = EngagementRunner(default_models / "engagement-baseline-v1" / "model.onnx", preference="cpu")
    assert runner.providers == ["CPUExecutionProvider"]


def test_auto_prefers_cuda_only_when_this_build_has_it() -> None:
    providers = select_providers("auto")
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        assert providers[0] == "CUDAExecutionProvider"
    else:
        assert providers == ["CPUExecutionProvider"]


@pytest.mark.skipif("CUDAExecutionProvider" in onnxruntime.get_available_providers(), reason="this build has CUDA")
def test_asking_for_cuda_without_it_is_a_clear_error() -> None:
    with pytest.raises(ConfigurationError, match="install the gpu extra"):
        select_providers("cuda")
