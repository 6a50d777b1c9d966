"""vzedge.export: the vision encoder with VisionZip as one ONNX graph, parity-checked, and a TensorRT engine.

    from vzedge.export import ExportConfig, export_vision
    export_vision(ExportConfig(model="tiny", out="out/tiny"))

Importing this package loads neither onnx, onnxruntime nor tensorrt; they are imported when used.
"""

if __name__ != "vzedge.export":
    raise ImportError(
        f"the {__name__!r} folder is the vzedge.export package: install vzedge (pip install -e .) "
        "and import vzedge.export"
    )

from vzedge.export.api import ExportResult, export_vision
from vzedge.export.config import ExportConfig
from vzedge.export.parity import ParityError

__all__ = ["ExportConfig", "ExportResult", "ParityError", "export_vision"]
