"""Packaging and "Set up backend": the zip's contents, the dialog's QProcess sequencing, and (slow)
a real backend environment built from the packaged zip that answers the worker hello."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import pytest

from test_plugin_support import ROOT, wait_until

sys.path.insert(0, str(ROOT / "tools"))
import package_plugin  # noqa: E402


@pytest.fixture(scope="module")
def plugin_zip(tmp_path_factory):
    return package_plugin.build(tmp_path_factory.mktemp("dist"))


def test_zip_contents(plugin_zip):
    assert plugin_zip.name == f"rscaption_plugin-{package_plugin.version()}.zip"
    names = zipfile.ZipFile(plugin_zip).namelist()
    for required in ("rscaption_plugin/__init__.py", "rscaption_plugin/metadata.txt", "rscaption_plugin/plugin.py",
                     "rscaption_plugin/requirements.txt", "rscaption_plugin/backend/rscaption/worker.py",
                     "rscaption_plugin/backend/rscaption/protocol.py", "rscaption_plugin/resources/icons/rscaption.svg"):
        assert required in names, required
    assert not [n for n in names if "__pycache__" in n or n.endswith((".pyc", ".pyo"))]
    assert all(n.startswith("rscaption_plugin/") for n in names)
    if (ROOT / "resources" / "default_model" / "config.json").is_file():
        assert "rscaption_plugin/resources/default_model/config.json" in names
    meta = zipfile.ZipFile(plugin_zip).read("rscaption_plugin/metadata.txt").decode()
    for key in ("name=", "qgisMinimumVersion=3.22", "description=", "about=", "version=", "author=", "email=",
                "repository=", "tracker=", "tags=", "icon=", "hasProcessingProvider=yes"):
        assert key in meta, key
    # what "Set up backend" installs: the runtime only, with versions chosen per Python by markers
    reqs = zipfile.ZipFile(plugin_zip).read("rscaption_plugin/requirements.txt").decode()
    pins = {line.split(";")[0].split("=")[0].split(">")[0].split("<")[0].strip().lower()
             for line in reqs.splitlines() if line.strip() and not line.startswith("#")}
    assert {"torch", "rasterio", "numpy"} <= pins
    assert not pins & {"ray", "hypothesis", "pytest", "pytest-qgis", "pycocoevalcap", "-r requirements.txt"}
    icon = meta.split("icon=")[1].splitlines()[0].strip()
    assert f"rscaption_plugin/{icon}" in names


def test_install_into_a_profile(plugin_zip, tmp_path):
    target = package_plugin.install(plugin_zip, tmp_path / "plugins")
    assert (target / "metadata.txt").is_file() and (target / "backend" / "rscaption" / "worker.py").is_file()
    # the installed copy finds its own backend and icons, not the source tree's
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from rscaption_plugin.core import paths; "
            "print(paths.backend_dir()); print(paths.icon_path('caption.svg'))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "plugins")], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[0] == str(target / "backend") and out[1].startswith(str(target))


def test_setup_dialog_runs_steps_in_order(qgis_app, tmp_path):
    from rscaption_plugin.ui.setup_backend import SetupBackendDialog, setup_steps

    steps = [("one", [sys.executable, "-c", "print('step one')"]),
             ("two", [sys.executable, "-c", "print('step two')"])]
    done = []
    dlg = SetupBackendDialog(target=tmp_path / "env", steps=steps, on_success=done.append)
    dlg.start()
    assert wait_until(lambda: dlg.succeeded is not None, 60)
    assert dlg.succeeded and done
    log = dlg.log.toPlainText()
    assert log.index("step one") < log.index("step two")
    diag = dlg.copy_diagnostics()
    assert "rscaption diagnostics" in diag and "step two" in diag

    failing = SetupBackendDialog(target=tmp_path / "env2", steps=[("bad", [sys.executable, "-c", "raise SystemExit(3)"])])
    failing.start()
    assert wait_until(lambda: failing.succeeded is not None, 60)
    assert failing.succeeded is False and "exit code 3" in failing.log.toPlainText()

    labels = [label for label, _ in setup_steps(tmp_path / "venv", python="/usr/bin/python3")]
    assert labels[0].startswith("Create") and labels[-1].startswith("Check")
    argv = setup_steps(tmp_path / "venv", python="/usr/bin/python3")[0][1]
    assert "--system-site-packages" in argv


@pytest.mark.slow
def test_setup_backend_from_the_packaged_zip(plugin_zip, tmp_path):
    """Builds a real env (pip installs torch from the local wheel cache: minutes) with the QGIS
    Python, exactly as the plugin's dialog would, then talks to the worker in it."""
    if not os.path.exists("/usr/bin/python3"):
        pytest.skip("needs the system Python that QGIS uses")
    plugins = tmp_path / "plugins"
    package_plugin.install(plugin_zip, plugins)
    env_dir = tmp_path / "backend-venv"
    code = ("import sys; sys.path.insert(0, sys.argv[1]); "
            "from rscaption_plugin.ui.setup_backend import run_setup; print('PYTHON', run_setup(sys.argv[2]))")
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    proc = subprocess.run(["/usr/bin/python3", "-c", code, str(plugins), str(env_dir)], capture_output=True,
                          text=True, timeout=1500, env=clean)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    python = proc.stdout.split("PYTHON")[-1].strip()
    assert python.startswith(str(env_dir))
    hello = subprocess.run([python, "-m", "rscaption.worker"], input='{"cmd": "info"}\n', capture_output=True,
                           text=True, timeout=300, env=dict(clean, HF_HUB_OFFLINE="1"))
    messages = [json.loads(line) for line in hello.stdout.splitlines() if line.strip()]
    first = next(m for m in messages if m["type"] == "hello")
    assert first["torch"] and first["device"] == "cpu" and first["executable"].startswith(str(env_dir))
    where = subprocess.run([python, "-c", "import rscaption; print(rscaption.__file__)"], capture_output=True,
                           text=True, env=clean, check=True).stdout.strip()
    assert where.startswith(str(env_dir))  # the copy installed from the zip, not the source tree
    # the runtime only: Ray, hypothesis and pytest are the developers' (requirements-dev.txt)
    probe = ("import importlib.util, sys; "
             "print([m for m in ('ray', 'hypothesis', 'pytest', 'pycocoevalcap') if importlib.util.find_spec(m)])")
    extra = subprocess.run([python, "-c", probe], capture_output=True, text=True, env=clean, check=True).stdout.strip()
    assert extra == "[]", extra
