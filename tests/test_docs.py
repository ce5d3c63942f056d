"""The front door stays exact: every setting is documented, and Sample.env is a valid configuration."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from proxy.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("document", ["Sample.env", "README.md"])
def test_every_setting_is_documented(document: str) -> None:
    text = (ROOT / document).read_text()
    missing = [name.upper() for name in Settings.model_fields if name.upper() not in text]
    assert missing == []


def test_sample_env_is_a_valid_configuration(tmp_path: Path) -> None:
    shutil.copy(ROOT / "Sample.env", tmp_path / ".env")
    settings = Settings()
    assert settings.host == "127.0.0.1"
    assert settings.port == 8000


def test_readme_shows_the_two_commands() -> None:
    text = (ROOT / "README.md").read_text()
    assert "uv run openai-proxy" in text
    assert "uv run pytest" in text
