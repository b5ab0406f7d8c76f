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

LAYERS = ("signatures", "files", "console", "data", "memory", "lm", "outputs", "persona", "agent", "programs",
          "evaluation", "optimizers", "jobs", "cli")
"""``persona_dspy``'s parts, lowest first: each may import only the parts before it (and itself). ``signatures`` is the
floor (dspy only); ``optimizers`` (teleprompters and losses) sits on the core; jobs and the CLI on top."""

TESTING = "testing"
"""Test support (the offline stand-in): it may import any product layer but ``jobs`` and ``cli``; no product module
imports it except ``lm.build``, lazily, when the stand-in is asked for by name."""

LAZY_TESTING_IMPORTS = {"persona_dspy/lm/build.py"}
FOLDERS = {"signatures": REPO / "signatures", "optimizers": REPO / "optimizers"}
"""Design folders at the top of the repo, installed as ``persona_dspy.<name>`` (pyproject's package-dir)."""


def test_ruff_is_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed (it comes with the dev extra)")
    result = subprocess.run([ruff, "check", "."], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-4000:]


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(module imported, at module level?) for every absolute import in ``path``."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, id(node) in top))
            found += [(f"{node.module}.{alias.name}", id(node) in top) for alias in node.names
                      if _module_path(f"{node.module}.{alias.name}") is not None]
    return found


def _module_name(path: Path) -> str:
    """The import name of a source file of the package, wherever its folder sits in the repo."""
    for part, folder in FOLDERS.items():
        if path.is_relative_to(folder):
            relative = path.relative_to(folder).with_suffix("")
            return ".".join(["persona_dspy", part, *relative.parts]).removesuffix(".__init__")
    relative = path.relative_to(REPO).with_suffix("")
    return ".".join(relative.parts).removesuffix(".__init__")


def _module_path(name: str) -> Path | None:
    parts = name.split(".")
    if parts[0] != "persona_dspy":
        return None
    base = FOLDERS[parts[1]] if len(parts) > 1 and parts[1] in FOLDERS else None
    rest = parts[2:] if base is not None else parts[1:]
    base = base if base is not None else REPO / "persona_dspy"
    target = base.joinpath(*rest) if rest else base
    for candidate in (target.with_suffix(".py"), target / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def _sources() -> list[Path]:
    return [*(REPO / "persona_dspy").rglob("*.py"), *(p for f in FOLDERS.values() for p in f.rglob("*.py"))]


def _part(module: str) -> str | None:
    """The layer of a ``persona_dspy`` module name, else None."""
    parts = module.split(".")
    return parts[1] if parts[0] == "persona_dspy" and len(parts) > 1 else None


def test_nothing_imports_the_design_folders_by_their_top_level_names():
    roots = [*_sources(), *(REPO / "tests").rglob("*.py"), *(REPO / "benchmarks").rglob("*.py")]
    for path in roots:
        for name, _ in _imports(path):
            assert name.split(".")[0] not in FOLDERS, f"{path.relative_to(REPO)} imports {name}: use persona_dspy."


def test_every_part_of_the_package_has_a_layer():
    parts = {p.stem for p in (REPO / "persona_dspy").iterdir() if p.name != "__init__.py"
             and (p.suffix == ".py" or (p / "__init__.py").exists())}
    assert parts | set(FOLDERS) == {*LAYERS, TESTING}


def test_every_package_folder_is_installed():
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {_module_name(p) for p in _sources() if p.name == "__init__.py"}
    assert listed == found


def test_package_parts_import_downwards_only():
    rank: dict[str, float] = {name: i for i, name in enumerate(LAYERS)}
    rank[TESTING] = rank["jobs"] - 0.5  # above every product layer it uses, below the jobs
    for path in _sources():
        module = _module_name(path)
        if module == "persona_dspy":
            continue  # the root package: the lazy public API
        own = _part(module)
        for name, top_level in _imports(path):
            part = _part(name)
            if part is None:
                continue
            where = f"{path.relative_to(REPO)} imports {name}"
            if part == TESTING and own != TESTING:
                assert str(path.relative_to(REPO)) in LAZY_TESTING_IMPORTS and not top_level, where
                continue
            assert rank[part] <= rank[own], where


def _assert_no_circle(graph: dict[str, set[str]]) -> None:
    """Fail naming the first circle found in ``graph`` (module -> modules it imports)."""
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if nxt.startswith(node + "."):
                continue  # a package importing its own submodule is not a circle
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join([*trail, node, nxt]))
            if nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_no_import_circle_at_module_level():
    """Within a layer, module-level imports form no circle (a lazy import inside a function is not an edge)."""
    graph = {}
    for path in _sources():
        module = _module_name(path)
        graph[module] = {name for name, top_level in _imports(path)
                         if top_level and _module_path(name) is not None and name != module}
    _assert_no_circle(graph)


MAX_LINES = 600


def test_every_file_is_readable_in_one_sitting():
    """No source or test file over ``MAX_LINES`` lines: a longer one is split by concern."""
    roots = [*_sources(), *(REPO / "tests").rglob("*.py")]
    long = {str(p.relative_to(REPO)): n for p in roots if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_no_import_circle_in_lm_even_lazily():
    """``lm`` and the stand-in import one way, inside functions too: config -> build -> pool, never back."""
    parts = ("persona_dspy.lm", "persona_dspy.testing")
    graph = {}
    for path in _sources():
        module = _module_name(path)
        if module.startswith(parts) and module not in parts:
            graph[module] = {name for name, _ in _imports(path) if name.startswith(parts) and name not in parts
                             and _module_path(name) is not None and name != module}
    _assert_no_circle(graph)


def test_no_private_name_is_imported_from_another_module():
    """A name with a leading underscore is its module's own: another module imports only public names."""
    found = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("persona_dspy")):
                found += [f"{path.relative_to(REPO)}: {alias.name} from {node.module}" for alias in node.names
                          if alias.name.startswith("_") and not alias.name.startswith("__")]
    assert not found, "private names imported across modules:\n" + "\n".join(found)


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
