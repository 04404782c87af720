"""blocklm: multimodal generative models trained on block lists.

Subpackages: :mod:`blocklm.formats` (the record format and shard codecs), :mod:`blocklm.tools`
(converters and the ``blocktool`` CLI), :mod:`blocklm.pipeline` (streaming loaders and the
shape-aware dispatcher) and :mod:`blocklm.model` (mode supports and the recurrent decoder).
"""

__version__ = "0.1.0"
