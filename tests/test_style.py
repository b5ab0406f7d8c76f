"""The code base stays lint-clean (ruff, line length 120) and imports point one way."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

PACKAGE_LAYERS = ("files", "data", "memory", "lm", "agent", "programs", "evaluation", "jobs", "cli")
"""``persona_dspy``'s parts, lowest first: each may import only the parts before it (and itself)."""

TESTING = "testing"
"""Test support (the offline stand-in): it may import any product layer but ``jobs`` and ``cli``; no product module
imports it except ``lm.build``, lazily, when the stand-in is asked for by name."""

LAZY_TESTING_IMPORTS = {"persona_dspy/lm/build.py"}


def test_ruff_is_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed (it comes with the dev extra)")
    result = subprocess.run([ruff, "check", "."], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-4000:]


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(module imported, at module level?) for every import in ``path``."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, id(node) in top))
            if node.module == "persona_dspy":  # from persona_dspy import programs (not: import lazy_exports)
                found += [(f"persona_dspy.{alias.name}", id(node) in top) for alias in node.names
                          if _is_module(REPO / "persona_dspy" / alias.name)]
    return found


def _is_module(path: Path) -> bool:
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _part(module: str) -> str | None:
    """The layer of a ``persona_dspy`` module name, else None."""
    parts = module.split(".")
    return parts[1] if parts[0] == "persona_dspy" and len(parts) > 1 else None


@pytest.mark.parametrize(("package", "forbidden"), [("signatures", {"optimizers", "persona_dspy"}),
                                                     ("optimizers", {"persona_dspy"})])
def test_layers_import_downwards_only(package, forbidden):
    for path in (REPO / package).rglob("*.py"):
        for name, _ in _imports(path):
            assert name.split(".")[0] not in forbidden, f"{path.relative_to(REPO)} imports {name}"


def test_every_part_of_the_package_has_a_layer():
    parts = {p.stem for p in (REPO / "persona_dspy").iterdir() if p.name != "__init__.py"
             and (p.suffix == ".py" or (p / "__init__.py").exists())}
    assert parts == {*PACKAGE_LAYERS, TESTING}


def test_package_parts_import_downwards_only():
    rank = {name: i for i, name in enumerate(PACKAGE_LAYERS)}
    rank[TESTING] = rank["jobs"] - 0.5  # above every product layer it uses, below the jobs
    for path in (REPO / "persona_dspy").rglob("*.py"):
        relative = path.relative_to(REPO / "persona_dspy")
        if relative.name == "__init__.py" and len(relative.parts) == 1:
            continue  # the root package: a docstring and the lazy re-export helper
        own = relative.parts[0].removesuffix(".py")
        for name, top_level in _imports(path):
            part = _part(name)
            if part is None:
                continue
            where = f"{path.relative_to(REPO)} imports {name}"
            if part == TESTING and own != TESTING:
                assert str(path.relative_to(REPO)) in LAZY_TESTING_IMPORTS and not top_level, where
                continue
            assert rank[part] <= rank[own], where


def test_the_product_path_does_not_load_the_stand_in():
    code = ("import sys\n"
            "import persona_dspy.cli, persona_dspy.jobs.compile, persona_dspy.jobs.tuning\n"
            "import persona_dspy.jobs.comparison, persona_dspy.evaluation.evaluate\n"
            "from persona_dspy.lm.build import build_lm\n"
            "build_lm('openai/m', 'http://127.0.0.1:9/v1')\n"
            "assert not [m for m in sys.modules if m.startswith('persona_dspy.testing')], 'stand-in loaded'\n"
            "build_lm('offline')\n"
            "assert 'persona_dspy.testing.offline_lm' in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_ray_is_imported_only_by_compile_ray(tmp_path):
    """Ray is an optional extra: a compile without --ray (and every module the CLI loads) never imports it."""
    code = ("import sys\n"
            "import persona_dspy.jobs.distributed, persona_dspy.lm.pool\n"
            "from persona_dspy.cli import main\n"
            f"code = main(['compile', '--task', 'LaMP_3', '--lm', 'offline', '--max-users', '1', '--iterations', '0',"
            f" '--memory', {str(tmp_path / 'mem')!r}, '--out', {str(tmp_path / 'out')!r}, '--no-progress'])\n"
            "assert code == 0, code\n"
            "assert 'ray' not in sys.modules, 'ray imported without --ray'\n")
    env = {**os.environ, "PERSONA_DSPY_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=env)
    assert result.returncode == 0, result.stderr[-3000:]
