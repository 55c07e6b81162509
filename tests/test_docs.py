"""The documentation: the tutorial runs end to end, the site builds with warnings as errors,
and every public class and function has a docstring and a place in the API reference."""

from __future__ import annotations

import importlib
import inspect
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# module -> its API page (the ids mkdocstrings gives are "<module>.<name>")
API_PAGES = {
    "molnets": "api/molnets",
    "molnets.layers": "api/layers",
    "molnets.ace": "api/ace",
    "molnets.models": "api/models",
    "molnets.neighbors": "api/neighbors",
    "molnets.testing": "api/testing",
    "molnets.training": "api/training",
}
FIGURES = ["equivariance.png", "weisfeiler_lehman.png", "finite_differences.png", "ace_homogeneity.png",
           "normalization.png", "parity.png", "md_energy.png"]


def _public_objects():
    """(module, name, object) for every class and function in the ``__all__`` of the API modules."""
    for module_name in API_PAGES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj):
                yield module_name, name, obj


def _own_docstring(obj) -> str:
    """The object's own docstring: not inherited, not the one dataclass/NamedTuple generate."""
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__
    if not doc or doc.startswith(f"{obj.__name__}("):
        return ""
    return doc.strip()


def _build(config: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
        capture_output=True, text=True, timeout=300,
    )


@pytest.fixture(scope="module")
def docs_copy(tmp_path_factory) -> Path:
    """docs/ and mkdocs.yml copied to a temporary folder, the tutorial executed in it."""
    tmp = tmp_path_factory.mktemp("docs")
    shutil.copytree(ROOT / "docs", tmp / "docs", ignore=shutil.ignore_patterns("index.md", "*.png", "run"))
    shutil.copy(ROOT / "docs" / "index.md", tmp / "docs" / "index.md")
    config = (ROOT / "mkdocs.yml").read_text()
    assert "paths: [src]" in config
    (tmp / "mkdocs.yml").write_text(config.replace("paths: [src]", f"paths: [{ROOT / 'src'}]"))
    env = dict(os.environ, MPLBACKEND="Agg", OMP_NUM_THREADS="1")
    run = subprocess.run(
        [sys.executable, str(tmp / "docs" / "render_tutorial.py"), "--workdir", str(tmp / "docs" / "tutorial")],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert run.returncode == 0, run.stderr[-6000:]
    return tmp


@pytest.fixture(scope="module")
def site(docs_copy) -> Path:
    build = _build(docs_copy / "mkdocs.yml", docs_copy / "site")
    assert build.returncode == 0, build.stderr[-6000:]
    assert "WARNING" not in build.stderr, build.stderr
    return docs_copy / "site"


def test_public_classes_and_functions_have_docstrings():
    missing = [f"{module}.{name}" for module, name, obj in _public_objects() if not _own_docstring(obj)]
    assert not missing, f"public names without a docstring: {missing}"


def test_tutorial_runs_and_writes_its_figures(docs_copy):
    tutorial = docs_copy / "docs" / "tutorial"
    page = (tutorial / "index.md").read_text()
    for figure in FIGURES:
        assert (tutorial / figure).stat().st_size > 1000, figure
        assert f"]({figure})" in page, f"{figure} is not shown on the tutorial page"
    for section in range(1, 7):
        assert f"\n## {section}." in page, f"section {section} missing"


def test_site_builds_strict_and_shows_the_tutorial(site):
    html = (site / "tutorial" / "index.html").read_text()
    for figure in FIGURES:
        assert f'src="{figure}"' in html and (site / "tutorial" / figure).exists(), figure
    # offline: the pages load nothing from another host
    for page in site.rglob("*.html"):
        text = page.read_text()
        assert 'src="http' not in text and "fonts.googleapis" not in text, page


def test_every_public_class_and_function_is_in_the_api_reference(site):
    pages = {module: (site / page / "index.html").read_text() for module, page in API_PAGES.items()}
    # where a function shadows its own submodule (molnets.describe), the page documents it at
    # the path where it is defined
    absent = [f"{module}.{name}" for module, name, obj in _public_objects()
              if f'id="{module}.{name}"' not in pages[module]
              and f'id="{obj.__module__}.{obj.__qualname__}"' not in pages[module]]
    assert not absent, f"public names missing from the API reference: {absent}"


def test_a_broken_reference_fails_the_build(docs_copy, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(docs_copy / "docs", broken / "docs")
    (broken / "mkdocs.yml").write_text((docs_copy / "mkdocs.yml").read_text())
    page = broken / "docs" / "api" / "ace.md"
    page.write_text(page.read_text() + "\n::: molnets.ace.NoSuchThing\n")
    build = _build(broken / "mkdocs.yml", broken / "site")
    assert build.returncode != 0
    assert "NoSuchThing" in build.stderr
