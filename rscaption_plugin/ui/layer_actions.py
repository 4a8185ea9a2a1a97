""""Find similar tiles" where a user right-clicks: the Layers panel and a tile's feature menus.

Two entry points because QGIS has two kinds of context menu. The Layers panel menu
(``iface.addCustomActionForLayer``) knows only the layer, so it matches the layer's selected tile
(or the dock's highlighted hit). The feature menus (attribute table rows, Identify results) come
from ``QgsMapLayerAction``, which hands over the clicked feature itself. Both are added only to
rscaption tile layers, as they appear in the project, and both just drive the search dock.
"""

from __future__ import annotations

from qgis.core import QgsProject
from qgis.gui import QgsGui, QgsMapLayerAction
from qgis.PyQt.QtGui import QIcon

from ..core.layers import is_tile_layer
from ..core.paths import icon_path
from ..core.qgis_compat import ACTION_SINGLE_FEATURE, LAYER_TYPE_VECTOR, QAction, connect_feature_action

TEXT = "Find similar tiles"


class SimilarTileActions:
    def __init__(self, iface, dock, show_dock):
        self.iface, self.dock, self.show_dock = iface, dock, show_dock
        self.tree_action = QAction(QIcon(icon_path("search.svg")), TEXT + " (to the selected tile)",
                                   iface.mainWindow())
        self.tree_action.setObjectName("rscaption_similar_layer")
        self.tree_action.triggered.connect(lambda *_: self.similar_for_layer(self.iface.activeLayer()))
        # "" puts it straight into the menu, not into a submenu; False: only for layers added below
        iface.addCustomActionForLayerType(self.tree_action, "", LAYER_TYPE_VECTOR, False)
        self.feature_actions: dict[str, QgsMapLayerAction] = {}
        project = QgsProject.instance()
        project.layersAdded.connect(self._layers_added)
        project.layersWillBeRemoved.connect(self._layers_removed)
        self._layers_added(list(project.mapLayers().values()))

    def _layers_added(self, layers) -> None:
        for layer in layers:
            if layer.id() in self.feature_actions or not is_tile_layer(layer):
                continue
            self.iface.addCustomActionForLayer(self.tree_action, layer)
            action = QgsMapLayerAction(TEXT, self.iface.mainWindow(), layer,
                                       ACTION_SINGLE_FEATURE, QIcon(icon_path("search.svg")))
            connect_feature_action(action, self.similar_for_feature)
            QgsGui.mapLayerActionRegistry().addMapLayerAction(action)
            self.feature_actions[layer.id()] = action

    def _layers_removed(self, layer_ids) -> None:
        for layer_id in list(layer_ids):
            action = self.feature_actions.pop(layer_id, None)
            if action is not None:
                QgsGui.mapLayerActionRegistry().removeMapLayerAction(action)
                action.deleteLater()  # it points at the layer, which is going away

    def similar_for_layer(self, layer):
        """Layers panel: the layer's one selected tile (or the dock's highlighted hit)."""
        if layer is None or not is_tile_layer(layer):
            return None
        self._show(layer)
        return self.dock.similar()

    def similar_for_feature(self, layer, feature):
        """Attribute table / Identify: the clicked tile itself."""
        self._show(layer)
        return self.dock.similar(int(feature["tile_id"]))

    def _show(self, layer) -> None:
        self.dock.set_layer(layer)
        self.show_dock()

    def unload(self) -> None:
        project = QgsProject.instance()
        for signal, slot in ((project.layersAdded, self._layers_added),
                             (project.layersWillBeRemoved, self._layers_removed)):
            try:
                signal.disconnect(slot)
            except (TypeError, RuntimeError):
                pass
        self._layers_removed(list(self.feature_actions))
        self.iface.removeCustomActionForLayerType(self.tree_action)
        self.tree_action.deleteLater()
