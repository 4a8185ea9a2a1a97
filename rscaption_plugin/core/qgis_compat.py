"""The QGIS and Qt API differences the plugin meets between QGIS 3.22 and QGIS 4 (Qt6), in one place.

Why each group is here:

* QGIS 3.26 to 3.36 moved many class enums into ``Qgis`` (``Qgis.LabelPlacement``,
  ``Qgis.LayerFilter``, ``Qgis.ProcessingSourceType``...). The old spellings live on as aliases,
  which are deprecated, may be dropped in QGIS 4, and can even clash: on 3.40
  ``QgsPalLayerSettings.OverPoint`` is ``Qgis.LabelPredefinedPointPosition.OverPoint``, which the
  label placement setter rejects with a TypeError. Each constant below is the new member where
  this QGIS has it, else the 3.22 member reached through its enum class (scoped access works on
  PyQt5 and PyQt6 alike). Old names are looked up by string, so an alias QGIS drops costs nothing.
* ``QgsField`` takes ``QMetaType.Type`` from QGIS 3.38 on (``QVariant.Type`` is deprecated there
  and gone in Qt6); 3.22 to 3.36 take only ``QVariant.Type`` (or its number).
* ``QgsMapLayerAction.triggerForFeature(layer, feature)`` and its ``triggeredForFeature`` signal
  are deprecated since QGIS 3.30: QGIS now calls the overload with a ``QgsMapLayerActionContext``,
  which emits only ``triggeredForFeatureV2``.
* Qt6 moved ``QAction`` from QtWidgets to QtGui.
"""

from __future__ import annotations

import qgis.core
import qgis.gui
from qgis.core import Qgis


def _lookup(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _pick(new: str, old: str):
    """``Qgis.<new>`` where this QGIS has that enum, else ``<old>`` from qgis.core or qgis.gui (QGIS
    3.22). A member missing from an enum that exists is a typo here and raises, rather than
    falling back to a deprecated alias."""
    enum_name, _, member = new.partition(".")
    if hasattr(Qgis, enum_name):
        return getattr(getattr(Qgis, enum_name), member)
    head, _, rest = old.partition(".")
    for module in (qgis.core, qgis.gui):
        value = _lookup(getattr(module, head, None), rest)
        if value is not None:
            return value
    raise AttributeError(f"neither Qgis.{new} nor {old} exists in QGIS {Qgis.QGIS_VERSION}")


# distance units (Qgis.DistanceUnit: 3.30)
DISTANCE_UNKNOWN = _pick("DistanceUnit.Unknown", "QgsUnitTypes.DistanceUnit.DistanceUnknownUnit")
DISTANCE_DEGREES = _pick("DistanceUnit.Degrees", "QgsUnitTypes.DistanceUnit.DistanceDegrees")
DISTANCE_METERS = _pick("DistanceUnit.Meters", "QgsUnitTypes.DistanceUnit.DistanceMeters")
# labels (Qgis.LabelPlacement: 3.26)
LABEL_OVER_POINT = _pick("LabelPlacement.OverPoint", "QgsPalLayerSettings.Placement.OverPoint")
# layer combo box filters (Qgis.LayerFilter: 3.34)
LAYER_FILTER_RASTER = _pick("LayerFilter.RasterLayer", "QgsMapLayerProxyModel.Filter.RasterLayer")
LAYER_FILTER_POLYGON = _pick("LayerFilter.PolygonLayer", "QgsMapLayerProxyModel.Filter.PolygonLayer")
# geometry and layer types, layer actions (3.30)
GEOMETRY_POLYGON = _pick("GeometryType.Polygon", "QgsWkbTypes.GeometryType.PolygonGeometry")
LAYER_TYPE_VECTOR = _pick("LayerType.Vector", "QgsMapLayerType.VectorLayer")
ACTION_SINGLE_FEATURE = _pick("MapLayerActionTarget.SingleFeature", "QgsMapLayerAction.Target.SingleFeature")
# Processing (3.36)
SOURCE_VECTOR_POLYGON = _pick("ProcessingSourceType.VectorPolygon", "QgsProcessing.SourceType.TypeVectorPolygon")
NUMBER_INTEGER = _pick("ProcessingNumberParameterType.Integer", "QgsProcessingParameterNumber.Type.Integer")
NUMBER_DOUBLE = _pick("ProcessingNumberParameterType.Double", "QgsProcessingParameterNumber.Type.Double")
# raster writer result (Qgis.RasterFileWriterResult on newer QGIS, e.g. 3.40)
RASTER_WRITE_OK = _pick("RasterFileWriterResult.Success", "QgsRasterFileWriter.WriterError.NoError")


def field_type(name: str):
    """A ``QgsField`` type: ``QMetaType.Type.<name>`` on QGIS >= 3.38 (the only kind Qt6 has); its
    number before, which QGIS 3.22 to 3.36 take for the ``QVariant.Type`` of the same number (Qt5
    numbers the built-in types alike in both), so no Qt5-only ``QVariant.Type`` is needed."""
    from qgis.PyQt.QtCore import QMetaType

    meta = getattr(QMetaType.Type, name)
    return meta if Qgis.QGIS_VERSION_INT >= 33800 else int(meta)


def connect_feature_action(action, slot) -> None:
    """Call ``slot(layer, feature)`` when the QgsMapLayerAction runs on one feature: through
    ``triggeredForFeatureV2`` (QGIS >= 3.30 emits only that one), else ``triggeredForFeature``."""
    signal = getattr(action, "triggeredForFeatureV2", None)
    if signal is not None:
        signal.connect(lambda layer, feature, _context: slot(layer, feature))
    else:
        action.triggeredForFeature.connect(slot)


def trigger_feature_action(action, layer, feature) -> None:
    """Run a QgsMapLayerAction on one feature the way this QGIS's attribute table does."""
    context = _lookup(qgis.gui, "QgsMapLayerActionContext") or _lookup(qgis.core, "QgsMapLayerActionContext")
    if context is not None:
        action.triggerForFeature(layer, feature, context())
    else:
        action.triggerForFeature(layer, feature)


try:  # Qt6 (QGIS 4)
    from qgis.PyQt.QtGui import QAction
except ImportError:  # Qt5
    from qgis.PyQt.QtWidgets import QAction

