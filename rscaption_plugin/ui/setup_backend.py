""""Set up backend": build a Python environment that can run the bundled backend.

QGIS's Python usually has no torch, and installing torch into it is neither possible nor wise,
so the plugin makes its own venv in the user's cache (outside the plugin folder, so updating the
plugin keeps it). ``--system-site-packages`` lets it reuse what the system already has (numpy,
GDAL bindings), and the pinned ``requirements.txt`` shipped in the zip decides the rest: the runtime
only (no Ray, training or test tools, which live in the source tree's ``requirements-dev.txt``). The
backend source itself is copied in, so the env works even if the plugin folder moves.

The steps are plain argv lists so the dialog can run them with QProcess (GUI stays live) and
tests/CLI can run them with subprocess. Before Start the dialog says what will be installed and how
large it is (``core/setup_plan.py``: on Linux without an NVIDIA GPU, the CPU build of torch rather
than 4 GB of CUDA libraries). Closing the window does not stop an install: the plugin keeps the one
dialog, so reopening shows the running install (never a second pip into the same folder), and the
end is announced in QGIS's message bar.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from qgis.PyQt.QtCore import QProcess, QProcessEnvironment
from qgis.PyQt.QtGui import QGuiApplication
from qgis.PyQt.QtWidgets import (
    QCheckBox,
    QDialog,
    QDialogButtonBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
)

from ..core.paths import backend_dir, backend_venv_dir, requirements_file, venv_python
from ..core.setup_plan import CPU_TORCH_INDEX, cpu_build_helps, install_plan, torch_pins

def base_python() -> str:
    """The interpreter QGIS itself embeds, to create the venv from. Inside QGIS ``sys.executable``
    is QGIS or whatever ``python3`` is first on PATH (seen: a pyenv shim), so derive it from
    ``sys.base_exec_prefix`` and the running version instead."""
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    prefix = Path(sys.base_exec_prefix)
    if sys.platform == "win32":
        candidates = [prefix / "python.exe", prefix / "python3.exe"]
    else:
        candidates = [prefix / "bin" / f"python{ver}", prefix / "bin" / "python3", Path(f"/usr/bin/python{ver}")]
    for cand in candidates:
        if cand.exists():
            return str(cand)
    return "python3"


def setup_steps(target: Path | None = None, python: str | None = None, requirements: Path | None = None,
                extra_pip_args: list[str] | None = None, cpu_torch: bool = False) -> list[tuple[str, list[str]]]:
    """(label, argv) for each step; argv[0] of later steps is the new env's python. ``cpu_torch``:
    torch and torchvision, as pinned, from the PyTorch CPU wheel index first (no CUDA libraries)."""
    target = Path(target or backend_venv_dir())
    python = python or base_python()
    requirements = Path(requirements or requirements_file() or "requirements.txt")
    py = str(venv_python(target))
    src = str(backend_dir() / "rscaption")
    copy_code = (
        "import shutil, sys, sysconfig, pathlib; "
        "dst = pathlib.Path(sysconfig.get_paths()['purelib']) / 'rscaption'; "
        "shutil.rmtree(dst, ignore_errors=True); "
        "shutil.copytree(sys.argv[1], dst, ignore=shutil.ignore_patterns('__pycache__', '*.pyc')); "
        "print('backend copied to', dst)"
    )
    check_code = (
        "import sys, torch, rasterio, rscaption, rscaption.worker, rscaption.engine.pipeline; "
        "from rscaption.device import pick_device; "
        "print('rscaption', rscaption.__version__, 'torch', torch.__version__, 'rasterio', rasterio.__version__, "
        "'device', pick_device(None))"
    )
    pins = torch_pins(requirements) if cpu_torch else []
    cpu = [("Install torch, CPU build (no CUDA libraries)",
            [py, "-m", "pip", "install", *pins, "--index-url", CPU_TORCH_INDEX, *(extra_pip_args or [])])] if pins else []
    return [
        ("Create the virtual environment", [python, "-m", "venv", "--system-site-packages", str(target)]),
        ("Upgrade pip", [py, "-m", "pip", "install", "--upgrade", "pip"]),
        *cpu,
        ("Install pinned requirements (torch is large: minutes)",
         [py, "-m", "pip", "install", "-r", str(requirements), *(extra_pip_args or [])]),
        ("Install the rscaption backend", [py, "-c", copy_code, src]),
        ("Check the backend", [py, "-c", check_code]),
    ]


def run_setup(target: Path | None = None, python: str | None = None, log=print, **kwargs) -> str:
    """Synchronous setup (tests, command line); returns the new env's python. Raises on failure."""
    target = Path(target or backend_venv_dir())
    target.parent.mkdir(parents=True, exist_ok=True)
    for label, argv in setup_steps(target, python, **kwargs):
        log(f"== {label}: {' '.join(argv[:6])}{' …' if len(argv) > 6 else ''}")
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_clean_env())
        for line in proc.stdout.splitlines()[-20:]:
            log(line)
        if proc.returncode != 0:
            raise RuntimeError(f"step '{label}' failed (exit {proc.returncode})")
    return str(venv_python(target))


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "PYTHONPATH", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


class SetupBackendDialog(QDialog):
    """Runs the steps with QProcess, one after another, streaming their output to a log."""

    def __init__(self, parent=None, target: Path | None = None, steps=None, on_success=None, on_done=None):
        super().__init__(parent)
        self.setWindowTitle("rscaption — Set up backend")
        self.target = Path(target or backend_venv_dir())
        self._steps = steps
        self.on_success = on_success
        self.on_done = on_done  # (ok, message): the plugin announces the end in the message bar
        self.process: QProcess | None = None
        self.index = -1
        self.succeeded: bool | None = None
        lay = QVBoxLayout(self)
        lay.addWidget(QLabel("Creates a Python environment with torch and the rscaption backend."))
        row = QHBoxLayout()
        row.addWidget(QLabel("Location"))
        self.target_edit = QLineEdit(str(self.target))
        row.addWidget(self.target_edit, 1)
        lay.addLayout(row)
        plan = install_plan(requirements_file())
        self.cpu_check = QCheckBox("Install the CPU build of torch (no NVIDIA CUDA libraries)")
        self.cpu_check.setChecked(plan.cpu_torch)
        self.cpu_check.setVisible(cpu_build_helps() and bool(torch_pins(requirements_file())))
        lay.addWidget(self.cpu_check)
        self.plan_label = QLabel("")  # what Start installs and its size, before it starts
        self.plan_label.setWordWrap(True)
        lay.addWidget(self.plan_label)
        self.cpu_check.toggled.connect(lambda _on: self._show_plan())
        self.target_edit.textChanged.connect(lambda _t: self._show_plan())
        self.progress = QProgressBar()
        lay.addWidget(self.progress)
        self.step_label = QLabel("")
        lay.addWidget(self.step_label)
        self.log = QPlainTextEdit()
        self.log.setReadOnly(True)
        self.log.setMinimumSize(640, 300)
        lay.addWidget(self.log, 1)
        buttons = QDialogButtonBox()
        self.start_button = QPushButton("Start")
        self.start_button.clicked.connect(self.start)
        self.copy_button = QPushButton("Copy log")
        self.copy_button.clicked.connect(lambda: QGuiApplication.clipboard().setText(self.log.toPlainText()))
        self.diag_button = QPushButton("Copy diagnostics")
        self.diag_button.clicked.connect(self.copy_diagnostics)
        self.cancel_button = QPushButton("Stop")
        self.cancel_button.clicked.connect(self.stop)
        self.cancel_button.setEnabled(False)
        buttons.addButton(self.start_button, QDialogButtonBox.ButtonRole.ActionRole)
        buttons.addButton(self.copy_button, QDialogButtonBox.ButtonRole.ActionRole)
        buttons.addButton(self.diag_button, QDialogButtonBox.ButtonRole.ActionRole)
        buttons.addButton(self.cancel_button, QDialogButtonBox.ButtonRole.ActionRole)
        buttons.addButton(QDialogButtonBox.StandardButton.Close)
        buttons.rejected.connect(self.reject)
        lay.addWidget(buttons)
        self._show_plan()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.state() != QProcess.ProcessState.NotRunning

    def plan(self):
        return install_plan(requirements_file(), cpu_torch=self.cpu_check.isChecked())

    def _show_plan(self) -> None:
        target = self.target_edit.text().strip() or str(backend_venv_dir())
        self.plan_label.setText(self.plan().text(target))

    def copy_diagnostics(self) -> str:
        """Diagnostics plus the end of the setup log: what a bug report about setup needs."""
        from .diagnostics import collect

        tail = "\n".join(self.log.toPlainText().splitlines()[-40:])
        text = collect() + (f"\n\nsetup log (last lines):\n{tail}" if tail else "")
        QGuiApplication.clipboard().setText(text)
        return text

    def start(self) -> None:
        if self.running:  # one install at a time into a folder
            return
        self.target = Path(self.target_edit.text().strip() or backend_venv_dir())
        self.index = -1
        self.succeeded = None
        self.steps = []
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self._done(False, f"cannot create {self.target.parent}: {exc.strerror or exc}")
            return
        self.steps = self._steps if self._steps is not None else setup_steps(
            self.target, cpu_torch=self.cpu_check.isChecked())
        self.progress.setRange(0, len(self.steps))
        self.progress.setValue(0)
        self.start_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.target_edit.setEnabled(False)
        self.cpu_check.setEnabled(False)
        self._next()

    def _next(self) -> None:
        self.index += 1
        if self.index >= len(self.steps):
            self._done(True, "backend ready: " + str(venv_python(self.target)))
            return
        label, argv = self.steps[self.index]
        self.step_label.setText(f"{self.index + 1}/{len(self.steps)}: {label}")
        self._append(f"== {label}\n$ {' '.join(argv)}")
        self.process = QProcess(self)
        env = QProcessEnvironment.systemEnvironment()
        for key in ("PYTHONHOME", "PYTHONPATH", "VIRTUAL_ENV"):
            env.remove(key)
        env.insert("PIP_DISABLE_PIP_VERSION_CHECK", "1")
        self.process.setProcessEnvironment(env)
        self.process.setProcessChannelMode(QProcess.ProcessChannelMode.MergedChannels)
        self.process.readyReadStandardOutput.connect(self._read)
        self.process.finished.connect(self._step_finished)
        self.process.errorOccurred.connect(self._error)
        self.process.start(argv[0], argv[1:])

    def _read(self) -> None:
        if self.process is not None:
            data = bytes(self.process.readAllStandardOutput()).decode("utf-8", errors="replace")
            if data.strip():
                self._append(data.rstrip())

    def _step_finished(self, code, _status=None) -> None:
        self._read()
        if code != 0:
            self._done(False, f"step failed with exit code {code}; see the log (Copy log to share it)")
            return
        self.progress.setValue(self.index + 1)
        self._next()

    def _error(self, err) -> None:
        if err == QProcess.ProcessError.FailedToStart:
            self._done(False, f"cannot start {self.steps[self.index][1][0]}")

    def stop(self) -> None:
        if self.process is not None and self.process.state() != QProcess.ProcessState.NotRunning:
            self.process.kill()
            self._done(False, "stopped")
            self.process.waitForFinished(5000)  # reaped here, not when the dialog is deleted

    def _done(self, ok: bool, message: str) -> None:
        if self.succeeded is not None:
            return
        self.succeeded = ok
        self._append(("OK: " if ok else "FAILED: ") + message)
        self.step_label.setText(message)
        self.start_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        self.target_edit.setEnabled(True)
        self.cpu_check.setEnabled(True)
        if ok and self.on_success is not None:
            self.on_success(str(venv_python(self.target)))
        if self.on_done is not None:
            self.on_done(ok, message)

    def _append(self, text: str) -> None:
        self.log.appendPlainText(text)
