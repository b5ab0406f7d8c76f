"""The docs site builds offline with ``mkdocs build --strict``, and its generated figures match the results files."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def docs_tables():
    spec = importlib.util.spec_from_file_location("docs_tables", REPO / "benchmarks" / "docs_tables.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mkdocs_builds_the_site_strictly(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        pytest.skip("mkdocs and mkdocs-material are not installed (they come with the dev extra)")
    site = tmp_path / "site"
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=REPO,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    pages = {p.relative_to(REPO / "docs").with_suffix("").as_posix() for p in (REPO / "docs").glob("*.md")}
    built = {p.parent.relative_to(site).as_posix() for p in site.glob("*/index.html")} | {"index"}
    assert pages <= built, f"pages not built: {pages - built}"


def test_a_page_left_out_of_the_nav_fails_the_strict_build(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        pytest.skip("mkdocs and mkdocs-material are not installed (they come with the dev extra)")
    copy = tmp_path / "repo"
    shutil.copytree(REPO / "docs", copy / "docs")
    shutil.copy(REPO / "mkdocs.yml", copy / "mkdocs.yml")
    (copy / "docs" / "orphan.md").write_text("# Orphan\n")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                            cwd=copy, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "orphan.md" in result.stderr


def test_generated_docs_match_the_results_files():
    tables = docs_tables()
    assert (REPO / "docs" / "benchmarks.md").read_text() == tables.benchmarks_page(), \
        "docs/benchmarks.md is out of date: run python benchmarks/docs_tables.py"
    readme = (REPO / "README.md").read_text()
    assert readme == tables.readme_with_table(readme), \
        "README's personalization table is out of date: run python benchmarks/docs_tables.py"


def test_an_edited_results_file_makes_the_generated_docs_stale(tmp_path):
    tables = docs_tables()
    results = tmp_path / "results"
    shutil.copytree(REPO / "benchmarks" / "results", results)
    data = json.loads((results / "personalization.json").read_text())
    data["rows"][0]["value"] += 0.25
    (results / "personalization.json").write_text(json.dumps(data))
    readme = (REPO / "README.md").read_text()
    assert tables.benchmarks_page(results) != (REPO / "docs" / "benchmarks.md").read_text()
    assert tables.readme_with_table(readme, results) != readme
    assert f"{data['rows'][0]['value']:.3f}" in tables.readme_with_table(readme, results)
