"""The documentation that is generated from code must match the code."""

from pathlib import Path

from pgotel_proxy.config import OPTIONS, reference_markdown

ROOT = Path(__file__).resolve().parent.parent


def test_configuration_reference_is_current():
    # Regenerate with: python -m pgotel_proxy.config > docs/configuration.md
    on_disk = (ROOT / "docs" / "configuration.md").read_text()
    assert on_disk.strip() == reference_markdown().strip()


def test_readme_names_the_test_command_and_every_option_is_documented():
    readme = (ROOT / "README.md").read_text()
    assert "bash .ci/run" in readme
    assert "pgotel-proxy demo" in readme
    reference = (ROOT / "docs" / "configuration.md").read_text()
    for name in OPTIONS:
        assert f"`{name}`" in reference
