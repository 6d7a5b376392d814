"""The packages' import rules (the README's Repository section), checked from the source of every module.

Each package may import only the packages below it. `trellis_cli` sits on top, but imports `qat` and
`server` only inside the command that needs them, so that `trellis serve` never loads training code.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> the project packages it may import (itself always allowed).
ALLOWED = {
    "trellis_kernels": set(),
    "trellis_runtime": {"trellis_kernels"},
    "qat": {"trellis_runtime", "trellis_kernels"},
    "server": {"trellis_runtime"},
    "trellis_cli": {"trellis_runtime", "trellis_kernels", "qat", "server"},
}
LAZY_ONLY = {"trellis_cli": {"qat", "server"}}  # imported inside functions, never at module level


def project_imports(path: Path) -> list[tuple[str, bool]]:
    """(imported project package, imported at module level) for each import statement in `path`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            package = name.split(".")[0]
            if package in ALLOWED:
                found.append((package, id(node) in top_level))
    return found


def modules() -> list[tuple[str, Path]]:
    return [(package, path) for package in ALLOWED
            for path in sorted((ROOT / package).rglob("*.py"))]


@pytest.mark.parametrize("package,path", modules(),
                         ids=[str(path.relative_to(ROOT)) for _, path in modules()])
def test_module_imports_only_packages_below_it(package: str, path: Path) -> None:
    for imported, at_module_level in project_imports(path):
        if imported == package:
            continue
        assert imported in ALLOWED[package], f"{path.relative_to(ROOT)} imports {imported}"
        if imported in LAZY_ONLY.get(package, ()):
            assert not at_module_level, (f"{path.relative_to(ROOT)} imports {imported} at module "
                                         "level; import it inside the command that needs it")


def test_the_rule_finds_a_violation(tmp_path: Path) -> None:
    module = tmp_path / "bad.py"
    module.write_text("import os\nfrom qat.ptq import quantize_model\n\ndef f():\n    import server\n")
    assert project_imports(module) == [("qat", True), ("server", False)]


def test_serving_loads_no_training_code() -> None:
    """What `trellis serve` imports before it loads a model: the command, the server, the engine."""
    code = ("import sys, trellis_cli.cli, server.serve, server.settings, trellis_runtime.engine, "
            "trellis_runtime.model\n"
            "trellis_cli.cli.build_parser()\n"
            "print(sorted(m for m in sys.modules if m == 'qat' or m.startswith('qat.')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            check=True)
    assert result.stdout.strip() == "[]"


def test_no_package_shadows_an_installed_one() -> None:
    """A top-level name another distribution also installs would hide it from whoever imports it
    (transformers imports Hugging Face's `kernels`, for one)."""
    from importlib.metadata import packages_distributions

    owners = packages_distributions()
    for package in ALLOWED:
        others = set(owners.get(package, [])) - {"trellis-runtime", "trellis_runtime"}
        assert not others, f"package {package} is also installed by {sorted(others)}"
