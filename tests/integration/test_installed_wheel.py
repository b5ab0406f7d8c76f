"""The package as a user installs it: a wheel built from this tree, in a fresh venv, run from another folder.

Nothing is downloaded: the wheel is built without build isolation (setuptools and wheel come with the dev extra)
and installed with ``--no-deps --no-index``; its dependencies are the ones this test runs with, made visible to
the fresh venv by a ``.pth`` line (which adds their folder but runs none of its ``.pth`` files, so this checkout's
editable install stays out). The README's main job then has to find the shipped LaMP samples inside the wheel.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "README.md", "persona_dspy", "optimizers", "signatures")
LAMP3_USER = "A1L7M2JXN4EZCR"


def run(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with this tree installed from a wheel; returns the venv folder."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "src"
    source.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=ignore)
        else:
            shutil.copy2(path, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(root / "dist"), str(source)],
        cwd=root)
    [wheel] = (root / "dist").glob("persona_dspy-*.whl")
    (root / "wheel-names.txt").write_text("\n".join(zipfile.ZipFile(wheel).namelist()))
    venv = root / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=root)
    python = venv / "bin" / "python"
    run([*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)], cwd=root)
    [fresh_site] = [Path(p) for p in run([str(python), "-c", "import site; print('\\n'.join(site.getsitepackages()))"],
                                         cwd=root).stdout.split() if Path(p).name == "site-packages"]
    (fresh_site / "_persona_dspy_test_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return venv


def user_env(tmp_path: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if key != "PYTHONPATH" and not key.startswith(("PERSONA_DSPY_", "VIRTUAL_ENV"))}
    return {**env, "PERSONA_DSPY_HOME": str(tmp_path / "home"), "PERSONA_DSPY_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


@pytest.mark.slow
def test_the_installed_wheel_runs_the_main_job_outside_the_checkout(installed, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = user_env(tmp_path)
    probe = ("import persona_dspy, json; from persona_dspy.data.lamp import dataset_dir, load_dataset; "
             "print(json.dumps({'package': persona_dspy.__file__, 'users': len(load_dataset(dataset_dir('LaMP_3')))}))")
    found = json.loads(run([str(installed / "bin" / "python"), "-c", probe], cwd=elsewhere, env=env).stdout)
    assert Path(found["package"]).is_relative_to(installed), f"imported from {found['package']}, not the wheel"
    assert found["users"] == 6
    out = tmp_path / "programs"
    result = run([str(installed / "bin" / "persona-dspy"), "compile", "--task", "LaMP_3", "--lm", "offline",
                  "--memory", ":memory:", "--users", LAMP3_USER, "--out", str(out), "--no-progress"],
                 cwd=elsewhere, env=env)
    assert "compiled 1" in result.stdout
    summary = json.loads((out / "compile_summary.json").read_text())
    assert summary["compiled"] == 1 and summary["failed"] == 0


@pytest.mark.slow
def test_the_wheel_installs_one_top_level_package(installed):
    names = (installed.parent / "wheel-names.txt").read_text().split()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"persona_dspy"}
    assert "persona_dspy/optimizers/persona_aligner.py" in names and "persona_dspy/signatures/labels.py" in names


@pytest.mark.slow
def test_a_project_with_its_own_signatures_and_optimizers_modules_imports_the_package(installed, tmp_path):
    """DSPy projects often keep a ``signatures.py``: the package's own modules live under ``persona_dspy`` only."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "signatures.py").write_text("MINE = 'signatures'\n")
    (project / "optimizers.py").write_text("MINE = 'optimizers'\n")
    code = ("import signatures, optimizers\n"
            "from persona_dspy import PersonaAligner, PersonaAgent, load_program\n"
            "from persona_dspy.signatures import PersonaSummary\n"
            "assert signatures.MINE == 'signatures' and optimizers.MINE == 'optimizers'\n"
            "print(PersonaAligner.__module__, PersonaSummary.__name__)\n")
    result = run([str(installed / "bin" / "python"), "-c", code], cwd=project, env=user_env(tmp_path))
    assert "persona_dspy.optimizers.persona_aligner PersonaSummary" in result.stdout
