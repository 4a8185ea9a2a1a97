"""The plugin stays ready for QGIS 4 (Qt6, PyQt6) while it runs on QGIS 3.22 to 3.44 (Qt5).

PyQt6 drops what PyQt5 tolerated: unscoped enum members (``Qt.AlignLeft``; PyQt6 knows only
``Qt.AlignmentFlag.AlignLeft``), ``exec_()``, ``QVariant`` as a type, ``QAction`` in QtWidgets;
plugins must import Qt through ``qgis.PyQt`` so QGIS picks the binding. QGIS 3.26 to 3.36 also
moved many class enums into ``Qgis``; the old spellings are aliases that may be dropped and can
clash (``QgsPalLayerSettings.OverPoint`` is a label *position* on 3.40). None of this fails on
QGIS 3.22, so the source is checked here instead: parsed with ``ast``, and every ``Name.attr``
chain rooted at a name imported from ``qgis.*`` is resolved against the running QGIS/PyQt to
tell an enum member reached through its enum class from one reached directly on a class.
"""

from __future__ import annotations

import ast
import configparser
import enum
import importlib
from pathlib import Path

import pytest

pytest.importorskip("qgis.core")

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "rscaption_plugin"
SOURCES = sorted(PLUGIN.rglob("*.py"))

#: Import roots a plugin must not use directly: ``qgis.PyQt`` maps to whichever binding QGIS runs.
DIRECT_BINDINGS = {"PyQt4", "PyQt5", "PyQt6", "sip"}
#: Qt6 moved these from QtWidgets to QtGui (allowed in QtWidgets only as an ``except ImportError`` fallback).
MOVED_TO_QTGUI = {"QAction", "QActionGroup", "QShortcut", "QUndoCommand", "QUndoGroup", "QUndoStack",
                  "QFileSystemModel"}
#: Gone in Qt6.
REMOVED_IN_QT6 = {"QRegExp", "QRegExpValidator", "QDesktopWidget", "qApp"}

_UNRESOLVED = object()


def _is_enum_class(obj) -> bool:
    """A PyQt5/sip enum (metaclass ``sip.enumtype``) or a Python enum (PyQt6, newer QGIS enums)."""
    return isinstance(obj, type) and (issubclass(obj, enum.Enum) or type(obj).__name__ == "enumtype")


def _is_enum_member(obj) -> bool:
    return _is_enum_class(type(obj))


def _fallback_imports(tree) -> set[int]:
    """ids of the import nodes inside ``except ImportError`` handlers (the Qt5 side of a Qt6 import)."""
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ExceptHandler) and "ImportError" in ast.unparse(node.type or ast.Name("")):
            ids.update(id(n) for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)))
    return ids


def _namespace(tree) -> dict:
    """Names imported from ``qgis`` modules anywhere in the file, bound to the running objects."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "qgis":
            try:
                module = importlib.import_module(node.module)
            except ImportError:
                continue
            for alias in node.names:
                value = getattr(module, alias.name, _UNRESOLVED)
                if value is _UNRESOLVED:  # a submodule (from qgis.PyQt import sip)
                    try:
                        value = importlib.import_module(f"{node.module}.{alias.name}")
                    except ImportError:
                        continue
                names[alias.asname or alias.name] = value
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "qgis" and alias.asname is None:
                    names["qgis"] = importlib.import_module("qgis")
    return names


def _resolve(node, names):
    if isinstance(node, ast.Name):
        return names.get(node.id, _UNRESOLVED)
    if isinstance(node, ast.Attribute):
        owner = _resolve(node.value, names)
        return _UNRESOLVED if owner is _UNRESOLVED else getattr(owner, node.attr, _UNRESOLVED)
    return _UNRESOLVED


def _enum_problem(node: ast.Attribute, names) -> str | None:
    """Why ``node`` (``Owner.attr``) is not a Qt6-proof enum spelling, or None."""
    owner = _resolve(node.value, names)
    if owner is _UNRESOLVED or not isinstance(owner, type):
        return None
    value = getattr(owner, node.attr, _UNRESOLVED)
    if value is _UNRESOLVED:
        return None  # absent in this QGIS: code for another version (compat look-ups go by string)
    if _is_enum_member(value) and not _is_enum_class(owner):
        return f"unscoped enum: write {owner.__name__}.{type(value).__name__}.{node.attr}"
    qgis_enum = (getattr(value, "__module__", "") or "").startswith("qgis") or \
        (getattr(type(value), "__module__", "") or "").startswith("qgis")
    if qgis_enum and isinstance(value, enum.Enum) and value.name != node.attr:
        return f"QGIS compatibility alias: write {type(value).__qualname__}.{value.name} (see qgis_compat)"
    if qgis_enum and _is_enum_class(value) and value.__name__ != node.attr:
        return f"QGIS compatibility alias: write {value.__qualname__} (see qgis_compat)"
    return None


def problems_in(path: Path, source: str | None = None) -> list[str]:
    source = path.read_text(encoding="utf-8") if source is None else source
    tree = ast.parse(source, filename=str(path))
    names = _namespace(tree)
    fallbacks = _fallback_imports(tree)
    found = []

    def report(node, text):
        found.append(f"{path.name}:{node.lineno}: {text}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in DIRECT_BINDINGS:
                    report(node, f"import {alias.name}: import Qt through qgis.PyQt")
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            module = node.module or ""
            if module.split(".")[0] in DIRECT_BINDINGS:
                report(node, f"from {module} import ...: import Qt through qgis.PyQt")
            imported = {a.name for a in node.names}
            if module.endswith("QtWidgets") and imported & MOVED_TO_QTGUI and id(node) not in fallbacks:
                report(node, f"{sorted(imported & MOVED_TO_QTGUI)} live in QtGui on Qt6 (qgis_compat.QAction)")
            if imported & REMOVED_IN_QT6:
                report(node, f"{sorted(imported & REMOVED_IN_QT6)} are gone in Qt6")
        elif isinstance(node, ast.FunctionDef) and node.name == "exec_":
            report(node, "def exec_: Qt6 has only exec")
        elif isinstance(node, ast.Call):
            func = node.func
            if (isinstance(func, ast.Attribute) and func.attr == "exec_") or \
                    (isinstance(func, ast.Name) and func.id == "exec_"):
                report(node, "exec_(): use exec()")
            if isinstance(func, ast.Name) and func.id == "QVariant":
                report(node, "QVariant(...): PyQt6 has no QVariant objects (use None / qgis.core.NULL)")
        elif isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id == "QVariant":
                report(node, f"QVariant.{node.attr}: QVariant types are gone in Qt6 (qgis_compat.field_type)")
                continue
            problem = _enum_problem(node, names)
            if problem:
                report(node, f"{ast.unparse(node)}: {problem}")
    return sorted(set(found))


def test_every_plugin_module_is_checked():
    assert len(SOURCES) > 20 and PLUGIN / "plugin.py" in SOURCES


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_plugin_source_is_qt6_ready(path):
    problems = problems_in(path)
    assert not problems, "\n".join(problems)


def test_the_checker_catches_qt5_idioms():
    """Each Qt5-only idiom the checker exists for is caught, and its Qt6-proof spelling passes."""
    bad = '''
from PyQt5.QtCore import QTimer
from qgis.PyQt.QtCore import Qt, QVariant
from qgis.PyQt.QtWidgets import QAction, QDialogButtonBox, QMessageBox, QSizePolicy
from qgis.core import QgsPalLayerSettings
dialog.exec_()
a = Qt.AlignLeft | Qt.UserRole
b = QDialogButtonBox.Ok, QMessageBox.Yes, QSizePolicy.Expanding
c = QVariant.Int
d = QgsPalLayerSettings.OverPoint
'''
    found = "\n".join(problems_in(Path("bad.py"), bad))
    for needle in ("PyQt5.QtCore", "QAction", "exec_()", "Qt.AlignLeft", "Qt.UserRole", "QDialogButtonBox.Ok",
                   "QMessageBox.Yes", "QSizePolicy.Expanding", "QVariant.Int", "QgsPalLayerSettings.OverPoint"):
        assert needle in found, f"{needle} not caught:\n{found}"
    good = '''
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtWidgets import QDialogButtonBox, QMessageBox, QSizePolicy
try:
    from qgis.PyQt.QtGui import QAction
except ImportError:
    from qgis.PyQt.QtWidgets import QAction
dialog.exec()
a = Qt.AlignmentFlag.AlignLeft, Qt.ItemDataRole.UserRole + 1
b = QDialogButtonBox.StandardButton.Ok, QMessageBox.StandardButton.Yes, QSizePolicy.Policy.Expanding
'''
    assert problems_in(Path("good.py"), good) == []


def test_metadata_declares_qt6_support():
    """QGIS 4 loads only plugins that say they support Qt6, and (its API version being 4) only
    with a maximum version of 4.x or more."""
    meta = configparser.ConfigParser(interpolation=None)
    meta.read(ROOT / "metadata.txt", encoding="utf-8")
    general = meta["general"]
    assert general.get("supportsQt6", "").strip().lower() in ("true", "yes", "1")
    assert int(general.get("qgisMaximumVersion", "3.99").split(".")[0]) >= 4
