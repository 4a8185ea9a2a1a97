"""The plugin object QGIS creates: actions, menu, toolbar, search dock, Processing provider.

Loading must stay cheap and torch-free (QGIS loads every enabled plugin at start-up), so the
dialogs are imported when first opened and the model is only touched inside tasks.
"""

from __future__ import annotations

from qgis.core import Qgis, QgsApplication
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtGui import QIcon
from qgis.PyQt.QtWidgets import QFileDialog, QMessageBox

from .ui.diagnostics import LAST_BACKEND
from .core.layers import is_tile_layer
from .core.paths import icon_path
from .core.qgis_compat import QAction

MENU = "&rscaption"


class RscaptionPlugin:
    def __init__(self, iface):
        self.iface = iface
        self.actions: list[QAction] = []
        self.toolbar = None
        self.dock = None
        self.provider = None
        self.layer_actions = None  # "Find similar tiles" in the layer and feature context menus
        self.runs: list = []  # CaptionRun objects, kept alive while their task runs
        self._setup_dialog = None  # one "Set up backend" dialog: reopening shows a running install
        self.backend_notice = None  # the message bar item saying no backend is set up yet

    # -- QGIS hooks --------------------------------------------------------------------------------
    def initProcessing(self):
        from .processing_provider import RscaptionProvider

        self.provider = RscaptionProvider()
        QgsApplication.processingRegistry().addProvider(self.provider)

    def initGui(self):
        self.initProcessing()
        self.toolbar = self.iface.addToolBar("rscaption")
        self.toolbar.setObjectName("RscaptionToolbar")
        self.caption_action = self._action("caption.svg", "Caption raster layer…", self.show_caption_dialog, toolbar=True)
        self.search_action = self._action("search.svg", "Search captioned tiles", self.toggle_dock, toolbar=True)
        self.search_action.setCheckable(True)
        self.change_action = self._action("change.svg", "Compare two dates…", self.show_change_dialog, toolbar=True)
        self.export_action = self._action("export.svg", "Export captioned tiles…", self.export_active_layer)
        self.setup_action = self._action("setup.svg", "Set up backend…", self.show_setup_dialog)
        self.settings_action = self._action("settings.svg", "Settings…", self.show_settings_dialog)
        self.about_action = self._action("rscaption.svg", "About / diagnostics…", self.show_about_dialog)

        from .ui.dock import SearchDock

        self.dock = SearchDock(self.iface, self.iface.mainWindow())
        self.iface.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, self.dock)
        self.dock.hide()
        self.dock.visibilityChanged.connect(self.search_action.setChecked)
        from .ui.layer_actions import SimilarTileActions

        self.layer_actions = SimilarTileActions(self.iface, self.dock, self.show_dock)
        self._announce_missing_backend()

    def _announce_missing_backend(self) -> None:
        """Nothing can caption or search until a backend exists: say so when QGIS starts, with the
        button that makes one, rather than first in the caption dialog."""
        from .ui.dialog_state import backend_missing

        if not backend_missing():
            return
        from qgis.PyQt.QtWidgets import QPushButton

        from .core.setup_plan import install_plan
        from .core.paths import requirements_file

        plan = install_plan(requirements_file())
        bar = self.iface.messageBar()
        item = bar.createMessage("rscaption", "no backend yet: QGIS's Python has no torch, and captioning and "
                                 f"search need it. Set up backend installs one (about {plan.download_gb:.1f} GB "
                                 "to download), or choose a Python with rscaption's requirements in Settings.")
        button = QPushButton("Set up backend…")
        button.clicked.connect(lambda *_: self.show_setup_dialog())
        item.layout().addWidget(button)
        bar.pushWidget(item, Qgis.MessageLevel.Info, 0)
        self.backend_notice = item

    def unload(self):
        for run in list(self.runs):
            run.cancel()
        if self.backend_notice is not None:  # its button would call an unloaded plugin
            try:
                self.iface.messageBar().popWidget(self.backend_notice)
            except RuntimeError:
                pass
            self.backend_notice = None
        if self._setup_dialog is not None:
            self._setup_dialog.stop()  # a pip killed here leaves a folder that Start redoes
            self._setup_dialog.deleteLater()
            self._setup_dialog = None
        for action in self.actions:
            self.iface.removePluginRasterMenu(MENU, action)
            self.iface.removeToolBarIcon(action)
        self.actions.clear()
        if self.layer_actions is not None:
            self.layer_actions.unload()
            self.layer_actions = None
        if self.toolbar is not None:
            self.toolbar.deleteLater()
            self.toolbar = None
        if self.dock is not None:
            self.dock.detach()
            self.iface.removeDockWidget(self.dock)
            self.dock.deleteLater()
            self.dock = None
        if self.provider is not None:
            QgsApplication.processingRegistry().removeProvider(self.provider)
            self.provider = None
        try:
            from .core.backend_client import POOL

            POOL.shutdown()
        except Exception:
            pass

    def _action(self, icon: str, text: str, slot, toolbar: bool = False) -> QAction:
        action = QAction(QIcon(icon_path(icon)), text, self.iface.mainWindow())
        action.setObjectName("rscaption_" + text.split()[0].lower().strip("…"))
        action.triggered.connect(lambda *_: slot())
        self.iface.addPluginToRasterMenu(MENU, action)
        if toolbar and self.toolbar is not None:
            self.toolbar.addAction(action)
        self.actions.append(action)
        return action

    # -- caption -------------------------------------------------------------------------------------
    def show_caption_dialog(self):
        from .ui.dialog import CaptionDialog

        dlg = CaptionDialog(self.iface)
        if dlg.exec() and dlg.request is not None:
            self.start_caption(dlg.request)

    def start_caption(self, request, on_done=None):
        """Start a caption run; returns the CaptionRun (tests wait on ``run.done``)."""
        from .ui.caption_run import CaptionRun

        def finished(run):
            if run in self.runs:
                self.runs.remove(run)
            LAST_BACKEND.update(run.backend)
            if run.layer is not None and self.dock is not None:
                self.dock.set_layer(run.layer)
            if on_done is not None:
                on_done(run)

        run = CaptionRun(request, self.iface, on_done=finished)
        run.task.backendReady.connect(LAST_BACKEND.update)
        self.runs.append(run)
        return run.start()

    # -- change between two dates ----------------------------------------------------------------------
    def show_change_dialog(self):
        from .ui.change_dialog import ChangeDialog

        dlg = ChangeDialog(self.iface)
        if dlg.exec() and dlg.request is not None:
            self.start_change(dlg.request)

    def start_change(self, request, on_done=None):
        """Start a comparison; returns the ChangeRun. Its change layer goes to the dock, which
        then lists the most changed tiles."""
        from .ui.change_run import ChangeRun

        def finished(run):
            if run in self.runs:
                self.runs.remove(run)
            LAST_BACKEND.update(run.backend)
            if run.layer is not None and self.dock is not None:
                self.dock.set_layer(run.layer)
                self.dock.change_panel.set_layer(run.layer)  # also when the combo already showed it
                self.show_dock()
            if on_done is not None:
                on_done(run)

        run = ChangeRun(request, self.iface, on_done=finished)
        self.runs.append(run)
        return run.start()

    # -- search --------------------------------------------------------------------------------------
    def toggle_dock(self):
        if self.dock is None:
            return
        if self.dock.isVisible():
            self.dock.hide()
            return
        active = self.iface.activeLayer()
        if active is not None and is_tile_layer(active):
            self.dock.set_layer(active)
        self.show_dock()

    def show_dock(self):
        if self.dock is not None:
            self.dock.show()
            self.dock.raise_()

    # -- export --------------------------------------------------------------------------------------
    def export_active_layer(self, dst: str | None = None):
        from .core.export import ExportError, export_layer

        layer = self.iface.activeLayer()
        if layer is None or not is_tile_layer(layer):
            self._warn("select a captioned tile layer (made by rscaption) in the Layers panel first")
            return None
        if dst is None:
            dst, _ = QFileDialog.getSaveFileName(self.iface.mainWindow(), "Export captioned tiles",
                                                 f"{layer.name()}.gpkg", "GeoPackage (*.gpkg)")
            if not dst:
                return None
        try:
            out = export_layer(layer, dst)
        except (ExportError, OSError) as exc:
            self._warn(f"export failed: {exc}")
            return None
        self.iface.messageBar().pushMessage("rscaption", f"exported to {out} (tiles, embeddings, metadata)",
                                            Qgis.MessageLevel.Success, 6)
        return out

    # -- settings, setup, about ----------------------------------------------------------------------
    def show_settings_dialog(self):
        from .ui.settings_dialog import SettingsDialog

        SettingsDialog(self.iface.mainWindow()).exec()

    def show_setup_dialog(self):
        """One dialog per session: closing its window leaves an install running, and reopening it
        shows that install's progress instead of a blank dialog whose Start would begin a second
        pip into the same folder."""
        from .core.settings import PluginSettings
        from .ui.setup_backend import SetupBackendDialog

        def use(python):
            s = PluginSettings.load()
            if not s.backend_python:
                s.backend_python = python
                s.save()

        if self._setup_dialog is None:
            self._setup_dialog = SetupBackendDialog(self.iface.mainWindow(), on_success=use,
                                                    on_done=self._setup_done)
        self._setup_dialog.show()
        self._setup_dialog.raise_()
        return self._setup_dialog

    def _setup_done(self, ok: bool, message: str) -> None:
        """The end of an install, where the person is looking even with the dialog closed."""
        if ok and self.backend_notice is not None:
            try:
                self.iface.messageBar().popWidget(self.backend_notice)
            except RuntimeError:  # already closed by the person
                pass
            self.backend_notice = None
        from .core.settings import PluginSettings

        python = PluginSettings.load().python()
        uses = ("captioning and search use it now" if python and python in message
                else f"Settings still name {python}: empty its Backend Python field to use the new one")
        text = (f"Set up backend finished: {message}; {uses}" if ok
                else f"Set up backend failed: {message} (Raster > rscaption > Set up backend… shows the log)")
        self.iface.messageBar().pushMessage("rscaption", text, Qgis.MessageLevel.Success if ok
                                            else Qgis.MessageLevel.Critical, 0 if not ok else 10)

    def show_about_dialog(self):
        from .ui.diagnostics import AboutDialog

        AboutDialog(self.iface.mainWindow()).exec()

    def _warn(self, text: str):
        try:
            self.iface.messageBar().pushMessage("rscaption", text, Qgis.MessageLevel.Warning, 6)
        except Exception:
            QMessageBox.warning(self.iface.mainWindow(), "rscaption", text)
