"""The layer rules of docs/architecture.md, checked on the source: runtime imports no other layer, no package
imports verify, no import cycles, and the wheel ships no test doubles."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"runtime": "ddpm_deploy.runtime", "trainer": "ddpm_deploy.trainer", "export": "ddpm_deploy.export",
          "verify": "ddpm_deploy.verify"}
# which layers each layer may import (docs/architecture.md, "Layers")
ALLOWED = {"runtime": {"runtime"}, "trainer": {"runtime", "trainer"}, "export": {"runtime", "trainer", "export"},
           "verify": {"runtime", "trainer", "export", "verify"}}


def _module_name(path: Path) -> str:
    folder = path.relative_to(ROOT).parts[0]
    rest = path.relative_to(ROOT / folder).with_suffix("").parts
    parts = [LAYERS[folder], *rest]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, top_level_only: bool = False) -> set[str]:
    """Absolute names of the ddpm_deploy modules ``path`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("ddpm_deploy"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            if not name.startswith("ddpm_deploy"):
                continue
            out.add(name)
            out.update(f"{name}.{a.name}" for a in node.names)  # `from pkg import module`
    return out


def _sources():
    for folder in LAYERS:
        yield from sorted((ROOT / folder).rglob("*.py"))


def _layer(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def test_each_layer_imports_only_the_layers_below_it():
    offenders = []
    for path in _sources():
        mine = path.relative_to(ROOT).parts[0]
        for name in _imports(path):
            layer = _layer(name)
            if layer is not None and layer not in ALLOWED[mine]:
                offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert offenders == []


def test_the_layer_check_sees_lazy_and_relative_imports(tmp_path):
    """The checker itself: an in-function absolute import and a relative one are both found."""
    probe = ROOT / "runtime" / "sampling" / "open.py"
    found = _imports(probe)
    assert "ddpm_deploy.runtime.device.loop.DeviceLoop" in found  # imported inside open_loop
    assert "ddpm_deploy.runtime.backends.base" in found  # `from ..backends.base import DeviceRunner, Runner`


def _import_graph(top_level_only: bool) -> dict[str, set[str]]:
    """module -> the modules it imports; importing a.b.c also runs the package a.b's __init__ (an edge too)."""
    modules = {_module_name(p): p for p in _sources()}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for imp in _imports(path, top_level_only=top_level_only):
            while imp and imp not in modules:
                imp = imp.rpartition(".")[0]
            while imp and imp != name:
                deps.add(imp)
                imp = imp.rpartition(".")[0]  # the packages above it, whose __init__ runs first
                if imp not in modules:
                    break
        graph[name] = deps
    return graph


# lazy imports that close a loop by design, each with its reason (none in runtime/)
ALLOWED_LAZY_CYCLES: set[tuple[str, str]] = set()


@pytest.mark.parametrize("top_level_only", [True, False], ids=["module level", "with lazy imports"])
def test_no_import_cycles(top_level_only):
    """No circle of imports, also through imports made inside functions (a lazy import hides a circle from Python,
    not from the design: the module that imports lazily still depends on the other)."""
    graph = _import_graph(top_level_only)
    # a package's __init__ importing its own submodules is how packages work, not a cycle
    edges = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(m, stack):
        state[m] = 1
        for d in edges.get(m, ()):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d] if d in stack else [m, d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in edges:
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_the_cycle_check_sees_a_lazy_circle(tmp_path, monkeypatch):
    """The checker itself: a circle closed by an import inside a function is found."""
    graph = _import_graph(top_level_only=False)
    graph["ddpm_deploy.runtime.errors"] = graph["ddpm_deploy.runtime.errors"] | {"ddpm_deploy.runtime.sampling.open"}
    seen, stack = set(), []

    def circle(m):
        if m in stack:
            return True
        if m in seen:
            return False
        seen.add(m)
        stack.append(m)
        found = any(circle(d) for d in graph.get(m, ()) if not m.startswith(d + "."))
        stack.pop()
        return found

    assert circle("ddpm_deploy.runtime.sampling.open")  # open → backends.base → errors → open


def test_runtime_device_loop_and_info_do_not_import_each_other():
    loop = _imports(ROOT / "runtime" / "device" / "loop.py")
    assert not any(i.startswith("ddpm_deploy.runtime.device.info") for i in loop)


@pytest.mark.slow
def test_wheel_ships_every_layer_and_no_test_double(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    [wheel] = tmp_path.glob("ddpm_deploy-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for layer in ("runtime", "trainer", "export", "verify"):
        assert f"ddpm_deploy/{layer}/cli.py" in names and f"ddpm_deploy/{layer}/py.typed" in names
    assert "ddpm_deploy/runtime/backends/base.py" in names and "ddpm_deploy/runtime/contract.py" in names
    assert "ddpm_deploy/runtime/sampling/host.py" in names and "ddpm_deploy/runtime/sampling/schedulers/unipc.py" in names
    assert not [n for n in names if "hostsim" in n or "/tests/" in n or n.startswith("tests/")]


@pytest.mark.parametrize("command", ["ddpm-train", "ddpm-export", "ddpm-run"])
def test_every_command_has_version_and_help(command):
    from importlib.metadata import entry_points, version

    [ep] = [e for e in entry_points(group="console_scripts") if e.name == command]
    from click.testing import CliRunner

    main = ep.load()
    r = CliRunner().invoke(main, ["--version"], prog_name=command)
    assert r.exit_code == 0 and r.output.strip() == f"{command} (ddpm-deploy) {version('ddpm-deploy')}"
    assert CliRunner().invoke(main, ["--help"]).exit_code == 0
