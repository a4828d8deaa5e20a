"""The import contract: layers with one-way imports, checked on every import statement (lazy ones included).

    operations   trainer.retrain, trainer.registry, trainer.correction_sim, trainer.__main__ (may use all below)
    training     the rest of trainer/                                   -> wbc_core
    serving      serverless/ -> wbc_core;  cvat_sync/ -> wbc_core       (never each other, never trainer)
    core         wbc_core/                                              -> nothing of ours

The serving image installs wbc_core + serverless with the `serve` extra only: neither may import a package
that only the `train` or `sync` extras bring (tqdm, matplotlib, requests).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("wbc_core", "serverless", "cvat_sync", "trainer")
OPERATIONS = ("trainer.retrain", "trainer.registry", "trainer.correction_sim", "trainer.__main__")
NOT_IN_SERVING_IMAGE = ("tqdm", "matplotlib", "requests", "trainer", "cvat_sync", "tests")


def layer(module: str) -> str:
    if module in OPERATIONS or any(module.startswith(op + ".") for op in OPERATIONS):
        return "operations"
    return module.split(".")[0]


ALLOWED = {
    "wbc_core": {"wbc_core"},
    "serverless": {"wbc_core", "serverless"},
    "cvat_sync": {"wbc_core", "cvat_sync"},
    "trainer": {"wbc_core", "trainer"},
    "operations": {"wbc_core", "serverless", "cvat_sync", "trainer", "operations"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """Every module ``path`` imports (absolute names; relative imports resolved), with line numbers."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            found.append((node.lineno, name))
            found += [(node.lineno, f"{name}.{alias.name}") for alias in node.names]
    return found


def product_modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))


def imported_layer(name: str) -> str | None:
    """The layer of an imported name, or None when it is not one of our packages."""
    top = name.split(".")[0]
    if top not in PACKAGES:
        return None
    # "from trainer import retrain" names trainer.retrain: take the longest module prefix that exists
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        path = REPO.joinpath(*parts[:n])
        if path.with_suffix(".py").is_file() or (path / "__init__.py").is_file():
            return layer(candidate)
    return layer(top)


def test_every_product_module_is_in_a_known_layer() -> None:
    modules = product_modules()
    assert len(modules) > 40
    assert all(layer(module_name(p)) in ALLOWED for p in modules)


def test_imports_only_point_down() -> None:
    violations = []
    for path in product_modules():
        source = layer(module_name(path))
        for lineno, name in imports(path):
            target = imported_layer(name)
            if target is not None and target not in ALLOWED[source]:
                violations.append(f"{path.relative_to(REPO)}:{lineno} ({source}) imports {name} ({target})")
    assert not violations, "imports against the layers:\n" + "\n".join(sorted(set(violations)))


@pytest.mark.parametrize("package", ["wbc_core", "serverless"])
def test_serving_code_imports_nothing_the_serving_image_lacks(package: str) -> None:
    bad = []
    for path in sorted((REPO / package).rglob("*.py")):
        if path.name == "cvat_sdk_function.py":
            continue  # runs in cvat-cli's environment, not in the Nuclio image (it may use what cvat-sdk brings)
        for lineno, name in imports(path):
            if name.split(".")[0] in NOT_IN_SERVING_IMAGE:
                bad.append(f"{path.relative_to(REPO)}:{lineno} imports {name}")
    assert not bad, "\n".join(bad)


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    """The checker itself can fail: a lazy import of training code inside a function is found."""
    path = REPO / "wbc_core" / "_layer_probe_for_test.py"
    path.write_text("def f():\n    from trainer.train_segmenter import train_segmenter\n    return train_segmenter\n")
    try:
        names = [name for _, name in imports(path)]
        assert "trainer.train_segmenter" in names
        assert imported_layer("trainer.train_segmenter") not in ALLOWED["wbc_core"]
        assert imported_layer("trainer.retrain") == "operations"
        assert imported_layer("cvat_sync.pull") not in ALLOWED["trainer"]
    finally:
        path.unlink()


def test_no_test_double_ships_in_a_product_package() -> None:
    assert not (REPO / "cvat_sync" / "standin").exists()
    for path in product_modules():
        for _, name in imports(path):
            assert not name.startswith("tests"), f"{path} imports the test package"
