"""The docs a user reads stay true to the code."""

from pathlib import Path

from kernel.settings import Settings
from model_export.manifest import MANIFEST

ROOT = Path(__file__).resolve().parents[1]


def test_every_setting_is_documented() -> None:
    text = (ROOT / "docs" / "configuration.md").read_text()
    missing = [name for name in Settings.model_fields if f"`CLASSLENS_{name.upper()}`" not in text]
    assert not missing, f"docs/configuration.md lacks {missing}"


def test_every_model_is_documented_with_its_licence() -> None:
    readme = (ROOT / "README.md").read_text()
    models = (ROOT / "docs" / "models.md").read_text()
    for name in MANIFEST:
        assert f"`{name}`" in models, name
        assert name in readme or name.split("-")[0] in readme, name


def test_readme_quick_start_commands_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "pip install . && classlens demo" in readme
    assert "scripts/test" in readme
    assert "scripts/test" in (ROOT / ".ci" / "run").read_text()
