"""pyproject.toml declares every third-party module taming_dist imports, and requirements.txt (the
pinned set `make venv` installs) stays within pyproject's ranges."""
import ast
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO = Path(__file__).resolve().parents[2]


def _project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _by_name(lines) -> dict[str, Requirement]:
    return {canonicalize_name(r.name): r for r in map(Requirement, lines)}


def imported_modules(root: Path) -> dict[str, str]:
    """Top-level names of the non-stdlib modules imported anywhere under `root` (at any depth in a
    file, and by `import_module("name")`), each with one file that imports it."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
                  in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant)
                  and isinstance(node.args[0].value, str)):
                names = [node.args[0].value]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top and top != root.name and top not in sys.stdlib_module_names:
                    found.setdefault(top, str(path.relative_to(root.parent)))
    return found


def pin_violations(pins: dict[str, Requirement], declared: dict[str, Requirement]) -> list[str]:
    """requirements.txt lines outside pyproject's range: an `==` pin must satisfy the declared
    specifier; a range (or a bare name) must hold the installed version, like the declared one."""
    bad = []
    for name, req in pins.items():
        spec = declared[name].specifier
        exact = [s.version for s in req.specifier if s.operator == "=="]
        if exact:
            if not spec.contains(exact[0], prereleases=True):
                bad.append(f"{req} is outside pyproject's {name}{spec}")
        else:
            installed = metadata.version(name)
            if not (req.specifier.contains(installed, prereleases=True) and spec.contains(installed, prereleases=True)):
                bad.append(f"{req} and pyproject's {name}{spec} do not both hold the installed {installed}")
    return bad


def test_every_imported_module_is_declared_and_every_dependency_used():
    project = _project()
    declared = set(_by_name(project["dependencies"]))
    # Optional features (text encoders, exports) import their extra's packages, lazily, where used.
    extras = set(_by_name(r for reqs in project.get("optional-dependencies", {}).values() for r in reqs))
    providers = metadata.packages_distributions()
    undeclared, used = {}, set()
    for module, where in imported_modules(REPO / "taming_dist").items():
        dists = {canonicalize_name(d) for d in providers.get(module, [])}
        assert dists, f"{where} imports {module!r}, which no installed distribution provides"
        used |= dists & declared
        if not dists & (declared | extras):
            undeclared[module] = f"{where} (distribution {', '.join(sorted(dists))})"
    assert not undeclared, f"imported but not in pyproject.toml [project] dependencies: {undeclared}"
    assert used == declared, f"declared but never imported by taming_dist/: {sorted(declared - used)}"


def test_requirements_pins_lie_within_pyproject_ranges():
    project = _project()
    declared = _by_name(project["dependencies"])
    extras = _by_name(r for reqs in project.get("optional-dependencies", {}).values() for r in reqs)
    lines = [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    pins = _by_name(line for line in lines if line)
    missing = sorted(set(declared) - set(pins))
    assert not missing, f"dependencies that requirements.txt does not pin (make venv would skip them): {missing}"
    unknown = sorted(set(pins) - set(declared) - set(extras))
    assert not unknown, f"requirements.txt pins packages pyproject.toml does not declare: {unknown}"
    assert pin_violations(pins, {**extras, **declared}) == []


def test_the_checks_catch_what_they_look_for(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text(
        "import os, yaml.constructor\nfrom . import x\nfrom pkg import y\n"
        "def f():\n    import importlib\n    importlib.import_module('einops.layers')\n")
    assert imported_modules(tmp_path / "pkg") == {"yaml": "pkg/m.py", "einops": "pkg/m.py"}
    declared = _by_name(["torch>=2.6", "pyyaml"])
    assert pin_violations(_by_name(["torch==2.5.1"]), declared) == ["torch==2.5.1 is outside pyproject's torch>=2.6"]
    assert pin_violations(_by_name(["torch==2.6.0", "PyYAML>=6.0,<7"]), declared) == []
    assert "do not both hold" in pin_violations(_by_name(["PyYAML<1"]), declared)[0]
