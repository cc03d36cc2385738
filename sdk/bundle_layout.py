"""Bundle file names both sides use: the exporter writes these files, the device agent reads them.

Kept in the sdk so neither side imports the other (exporters never import fedclip.device_agent).
"""

from __future__ import annotations

# The frozen weights' index next to a step-format bundle's shared weights file: per graph, each
# initializer's offset, length, dtype and shape (fedclip.device_agent.shared_weights reads it).
INDEX_FILE = "weights_index.json"
INDEX_FORMAT = 1
