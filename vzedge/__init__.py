"""vzedge: VisionZip token compression for vision-language models on edge devices.

Public API::

    from vzedge import VisionZipConfig, VisionZipEncoder, apply_visionzip
"""

from __future__ import annotations

from vzedge.encoder import VisionZipEncoder, VisionZipOutput
from vzedge.models.llava import apply_visionzip, remove_visionzip
from vzedge.visionzip import VisionZipConfig

__version__ = "0.1.0"

__all__ = [
    "VisionZipConfig",
    "VisionZipEncoder",
    "VisionZipOutput",
    "__version__",
    "apply_visionzip",
    "remove_visionzip",
]
