import pytest

from kernel.errors import ConfigurationError
from kernel.settings import load_settings


def test_unknown_environment_keys_are_rejected(isolated_env: object, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLASSLENS_SAMPLE_FSP", "2")
    with pytest.raises(ConfigurationError, match="CLASSLENS_SAMPLE_FSP"):
        load_settings()


def test_bad_values_name_the_key(isolated_env: object) -> None:
    with pytest.raises(ConfigurationError, match="sample_fps"):
        load_settings(sample_fps=-1)
    with pytest.raises(ConfigurationError, match="multiple of 32"):
        load_settings(detector_input_size=500)


def test_defaults_use_sqlite_in_the_data_dir(isolated_env: object, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings()
    assert settings.resolved_database_url.startswith("sqlite:///")
    assert settings.resolved_database_url.endswith("classlens.sqlite3")
    monkeypatch.setenv("CLASSLENS_DATABASE_URL", "postgresql+psycopg://u@h/db")
    assert load_settings().resolved_database_url == "postgresql+psycopg://u@h/db"
