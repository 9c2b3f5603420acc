"""The documentation lists every setting the plugin has."""

from pathlib import Path

from pytest_ostimages.config import SETTINGS

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_every_setting_is_documented() -> None:
    options = (DOCS / "options.md").read_text()
    for setting in SETTINGS:
        row = f"| `{setting.option}` | `{setting.ini}` | `{setting.env}` |"
        assert row in options, f"docs/options.md has no row for {setting.option}"
