"""The layers of docs/architecture.md, checked: each package imports only the ones below it.

Read from the source (every ``import`` and ``from ... import`` statement, at any depth), so a
lazy import inside a function counts too. The two exceptions are named here: the CLI's demo
commands import the demo lazily, since the demo sits on top of everything; and the migrations'
Alembic environment, run by plain `alembic`, reads the store URL from app.settings.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["learners", "streams", "trainer", "app", "demo"]  # bottom first
ALLOWED = {name: set(LAYERS[: i + 1]) for i, name in enumerate(LAYERS)}
ALLOWED["migrations"] = {"migrations", "streams"}  # the migrations sit beside the store they migrate
for upper in ("app", "demo"):
    ALLOWED[upper].add("migrations")  # `feedloop db upgrade` and every process's start-up
DEMO_ENTRY = ROOT / "app" / "cli.py"  # `feedloop demo` and `feedloop model init` build the toy world


def imported_packages(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


def violations(package: str) -> list[str]:
    ours = set(ALLOWED) | {"migrations"}
    problems = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for line, imported in imported_packages(path):
            if imported not in ours or imported in ALLOWED[package]:
                continue
            if imported == "demo" and path == DEMO_ENTRY:
                continue
            problems.append(f"{path.relative_to(ROOT)}:{line} imports {imported}")
    return problems


@pytest.mark.parametrize("package", [*LAYERS, "migrations"])
def test_each_package_imports_only_the_layers_below_it(package: str) -> None:
    if not (ROOT / package).is_dir():
        pytest.skip(f"no {package}/ package")
    assert violations(package) == []


def test_the_check_sees_a_lazy_upward_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from app.settings import Settings\n    import demo.driver\n")
    assert imported_packages(module) == [(2, "app"), (3, "demo")]


def test_only_the_client_factory_builds_kafka_clients() -> None:
    # A client built elsewhere would miss the TLS and SASL settings (streams/kafka.py).
    clients = {"AIOKafkaProducer", "AIOKafkaConsumer", "AIOKafkaAdminClient"}
    factory = ROOT / "streams" / "kafka.py"
    builders = []
    for package in ("learners", "streams", "trainer", "app", "demo", "migrations"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                name = getattr(getattr(node, "func", None), "id", None) or getattr(getattr(node, "func", None), "attr", None)
                if isinstance(node, ast.Call) and name in clients and path != factory:
                    builders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert builders == [], f"build these with streams.kafka.producer/consumer/admin: {builders}"
