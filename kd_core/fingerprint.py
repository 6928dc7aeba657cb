"""Which kd_core source a stage function can run, and a hash of it: the code part of a cache key.

A key that hashed all of kd_core made any edit (a docstring in ``kd_core/bench``) recompute every
stage of every flow. Here a stage's key hashes only the code its function can reach, found
statically in the import graph at the level of top-level definitions:

* a unit is a module's body (its top-level statements other than definitions) or one top-level
  function or class;
* a function depends on its module's body, on every kd_core name it uses (defined in its module,
  imported at module level, or imported inside the function) and on what those depend on;
* a module body depends on its package's ``__init__`` bodies, on the modules it imports, on the
  names its own statements use (a table's functions) and on its decorated definitions (a
  decorator runs on import and may register the function: ``@register_loss``, ``@recipe``);
* ``from pkg import name`` that ``pkg.__getattr__`` serves (a lazy package) depends on that
  ``__getattr__``.

Imports under ``if TYPE_CHECKING:`` never run, so they add nothing; nor do the imports of a
function marked :func:`check_only` (a config validator that returns its value unchanged or
raises: it decides whether a config loads, never what a stage computes). Code outside kd_core (torch,
transformers) is not hashed: the installed versions are the environment's, as before.
tests/test_fingerprint.py checks the reach against the functions a real stage run calls.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

PACKAGE = "kd_core"
ROOT = Path(__file__).resolve().parent

Unit = tuple[str, str | None]  # (module, top-level name), None for the module's body


def check_only(fn: Callable) -> Callable:
    """Marks a validator that returns its value unchanged or raises: a stage's code fingerprint
    does not follow what it uses (the loss table behind a loss-name check, say)."""
    return fn


@dataclass
class _Module:
    name: str
    path: Path
    source: str
    defs: dict[str, ast.AST] = field(default_factory=dict)  # top-level functions and classes
    body: list[ast.stmt] = field(default_factory=list)  # the other top-level statements, as they run
    bindings: dict[str, Unit] = field(default_factory=dict)  # names its top-level imports bind


class Analyzer:
    """The import graph of the kd_core sources under ``root``, as ``read`` returns them."""

    def __init__(self, root: Path = ROOT, read: Callable[[Path], str] | None = None):
        self.root = root
        self.read = read or (lambda path: path.read_text())
        self._modules: dict[str, _Module | None] = {}
        self._closures: dict[Unit, frozenset[Unit]] = {}
        self._direct_cache: dict[Unit, set[Unit]] = {}
        self._sources: dict[Unit, bytes] = {}
        self._fingerprints: dict[frozenset[Unit], str] = {}

    # ---- modules ------------------------------------------------------------------------------
    @functools.lru_cache(maxsize=None)  # noqa: B019 - one analyzer per process, kept for its lifetime
    def path_of(self, module: str) -> Path | None:
        if module != PACKAGE and not module.startswith(PACKAGE + "."):
            return None
        parts = module.split(".")[1:]
        base = self.root.joinpath(*parts)
        for candidate in (base.with_suffix(".py") if parts else None, base / "__init__.py"):
            if candidate is not None and candidate.is_file():
                return candidate
        return None

    def module(self, name: str) -> _Module | None:
        if name not in self._modules:
            path = self.path_of(name)
            self._modules[name] = None if path is None else self._parse(name, path)
        return self._modules[name]

    def _parse(self, name: str, path: Path) -> _Module:
        source = self.read(path)
        info = _Module(name, path, source)
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for stmt in ast.parse(source).body:
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                info.defs[stmt.name] = stmt
                continue
            if _is_type_checking_block(stmt):
                continue
            info.body.append(stmt)
            for node in _imports(stmt):
                info.bindings.update(self._bind(node, package))
        return info

    def _bind(self, node: ast.Import | ast.ImportFrom, package: str) -> dict[str, Unit]:
        """The names an import statement binds, each to the unit it refers to."""
        bound: dict[str, Unit] = {}
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    bound[alias.asname] = (alias.name, None)
                else:  # `import kd_core.x.y` binds `kd_core`, and runs x and y
                    bound[alias.name.split(".")[0]] = (alias.name, None)
            return bound
        base = node.module or ""
        if node.level:
            anchor = package.split(".")
            anchor = anchor[: len(anchor) - node.level + 1]
            base = ".".join(anchor + ([node.module] if node.module else []))
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            target: Unit = (submodule, None) if self.path_of(submodule) else (base, alias.name)
            bound[alias.asname or alias.name] = target
        return bound

    # ---- units --------------------------------------------------------------------------------
    def resolve(self, unit: Unit) -> Unit | None:
        """A symbol to the unit that defines it (through re-exports), or None outside kd_core."""
        seen = set()
        while unit not in seen:
            seen.add(unit)
            module, name = unit
            info = self.module(module)
            if info is None:
                return None
            if name is None or name in info.defs:
                return unit
            if name in info.bindings:
                unit = info.bindings[name]
                continue
            if "__getattr__" in info.defs and not _assigned(info, name):
                return (module, "__getattr__")  # a lazy package serves it
            return (module, None)  # a constant of the module's body
        return unit

    def closure(self, unit: Unit) -> frozenset[Unit]:
        """``unit`` and every unit it can reach."""
        start = self.resolve(unit)
        if start is None:
            return frozenset()
        if start not in self._closures:
            found, todo = {start}, [start]
            while todo:
                for direct in self.direct(todo.pop()):
                    resolved = self.resolve(direct)
                    if resolved is not None and resolved not in found:
                        found.add(resolved)
                        todo.append(resolved)
            self._closures[start] = frozenset(found)
        return self._closures[start]

    def direct(self, unit: Unit) -> set[Unit]:
        """The units ``unit`` uses itself (cached)."""
        if unit not in self._direct_cache:
            self._direct_cache[unit] = self._direct(unit)
        return self._direct_cache[unit]

    def _direct(self, unit: Unit) -> set[Unit]:
        module, name = unit
        info = self.module(module)
        deps: set[Unit] = set()
        parent = module.rsplit(".", 1)[0] if "." in module else None
        if name is None:
            if parent:
                deps.add((parent, None))  # importing a.b.c runs a and a.b first
            deps.update((target[0], None) for target in info.bindings.values())
            # a decorator runs on import and may keep the function (a registry's @register_loss)
            deps.update((module, n) for n, node in info.defs.items() if node.decorator_list)
            nodes, local = info.body, {}
        else:
            deps.add((module, None))
            node = info.defs[name]
            if any(isinstance(d, ast.Name) and d.id == "check_only" for d in getattr(node, "decorator_list", [])):
                return deps
            package = module if info.path.name == "__init__.py" else parent or module
            local = {}
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    bound = self._bind(inner, package)
                    for target in bound.values():
                        deps.update({target, (target[0], None)})
                    local.update(bound)
            nodes = [node]
        for stmt in nodes:
            for inner in ast.walk(stmt):
                if isinstance(inner, ast.Name):
                    target = self._name(info, local, inner.id)
                    if target is not None:
                        deps.add(target)
                elif isinstance(inner, ast.Attribute) and isinstance(inner.value, ast.Name):
                    base = self._name(info, local, inner.value.id)
                    if base is not None and base[1] is None and self.module(base[0]) is not None:
                        deps.add((base[0], inner.attr))  # module.attr
        deps.discard(unit)
        return {d for d in deps if self.module(d[0]) is not None}

    @staticmethod
    def _name(info: _Module, local: dict[str, Unit], name: str) -> Unit | None:
        if name in local:
            return local[name]
        if name in info.defs:
            return (info.name, name)
        return info.bindings.get(name)

    def source_of(self, unit: Unit) -> str:
        """The unit's source lines (a body: its statements'; a definition: with its decorators)."""
        module, name = unit
        info = self.module(module)
        lines = info.source.splitlines()
        nodes = info.body if name is None else [info.defs[name]]
        spans = []
        for node in nodes:
            first = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
            spans.append("\n".join(lines[first - 1: node.end_lineno]))
        return "\n".join(spans)

    def fingerprint(self, units: frozenset[Unit]) -> str:
        if units not in self._fingerprints:
            digest = hashlib.sha256()
            for unit in sorted(units, key=lambda u: (u[0], u[1] or "")):
                digest.update(f"{unit[0]}:{unit[1] or ''}\n".encode())
                if unit not in self._sources:
                    self._sources[unit] = self.source_of(unit).encode()
                digest.update(self._sources[unit])
                digest.update(b"\0")
            self._fingerprints[units] = digest.hexdigest()[:16]
        return self._fingerprints[units]


def _imports(stmt: ast.stmt):
    """The import statements a top-level statement runs (``try``/``if`` bodies included)."""
    for node in ast.walk(stmt):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node


def _is_type_checking_block(stmt: ast.stmt) -> bool:
    test = getattr(stmt, "test", None) if isinstance(stmt, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _assigned(info: _Module, name: str) -> bool:
    for stmt in info.body:
        for node in ast.walk(stmt):
            if isinstance(node, ast.Name) and node.id == name and isinstance(node.ctx, ast.Store):
                return True
    return False


def unit_of(fn: Callable) -> Unit:
    """The top-level definition a stage callable runs (a ``functools.partial`` unwrapped)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return (fn.__module__, fn.__qualname__.split(".")[0])


# Stage threads compute keys at once: the analyzer's caches are plain dicts, and CPython 3.11's
# ast.parse is not safe from several threads ("AST constructor recursion depth mismatch").
_LOCK = threading.Lock()


@functools.lru_cache(maxsize=1)
def _default() -> Analyzer:
    return Analyzer()


def reach(fn: Callable, analyzer: Analyzer | None = None) -> frozenset[Unit]:
    """Every kd_core unit ``fn`` can run."""
    with _LOCK:
        return (analyzer or _default()).closure(unit_of(fn))


def code_fingerprint(fn: Callable, analyzer: Analyzer | None = None) -> str:
    """A hash of the source of every kd_core unit ``fn`` can run."""
    with _LOCK:
        analyzer = analyzer or _default()
        return analyzer.fingerprint(analyzer.closure(unit_of(fn)))
