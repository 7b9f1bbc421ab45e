"""The documentation must match the code: generated references, the functions it names, its links."""

import ast
import re
from pathlib import Path

import pytest

from pgotel_proxy.config import OPTIONS, Config, reference_markdown

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


# --------------------------------------------------------------------------
# docs/architecture.md: the byte's walk names functions that exist

_WALK_HOP = re.compile(r"^\d+\. `(pgotel_proxy/[\w/]+\.(?:py|c)):([\w.]+)`", re.MULTILINE)


def _defines(path: Path, name: str) -> bool:
    """Whether ``path`` defines ``name`` (``Class.method`` for a method; a C function for a .c file)."""
    text = path.read_text()
    if path.suffix == ".c":
        # C functions here are written with the name at the start of its line.
        return re.search(rf"^{re.escape(name)}\(", text, re.MULTILINE) is not None
    scope = ast.parse(text).body
    for part in name.split("."):
        found = [n for n in scope if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                 and n.name == part]
        if not found:
            return False
        scope = found[0].body
    return True


def _walk_hops() -> list[tuple[str, str]]:
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("## A byte's walk", 1)[1].split("\n## ", 1)[0]
    return _WALK_HOP.findall(section)


def test_architecture_walk_has_at_most_eight_hops_each_an_existing_function():
    hops = _walk_hops()
    assert 1 <= len(hops) <= 8, hops
    for path, name in hops:
        assert (ROOT / path).is_file(), f"no file {path}"
        assert _defines(ROOT / path, name), f"{path} defines no {name}"


def test_walk_checker_notices_a_missing_function():
    assert _defines(ROOT / "pgotel_proxy" / "tracing" / "process.py", "ProcessTracer._send")
    assert not _defines(ROOT / "pgotel_proxy" / "tracing" / "process.py", "ProcessTracer._no_such_step")
    assert _defines(ROOT / "pgotel_proxy" / "proxy" / "_pump.c", "pump_in")
    assert not _defines(ROOT / "pgotel_proxy" / "proxy" / "_pump.c", "pump_out_of_nowhere")


# --------------------------------------------------------------------------
# Pages for readers: short where promised, links that resolve

READER_PAGES = ["README.md", "docs/architecture.md", "docs/operations.md", "docs/traces.md", "bench/README.md"]


def test_readme_and_bench_readme_stay_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
    assert len((ROOT / "bench" / "README.md").read_text().splitlines()) <= 400


@pytest.mark.parametrize("page", READER_PAGES)
def test_relative_links_resolve(page):
    doc = ROOT / page
    text = doc.read_text()
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
        assert (doc.parent / target).resolve().exists(), f"{page}: broken link {target}"


def test_operations_has_the_metrics_markers_under_its_heading():
    text = (ROOT / "docs" / "operations.md").read_text()
    metrics = text.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    assert metrics.index("<!-- metrics:begin -->") < metrics.index("<!-- metrics:end -->")
