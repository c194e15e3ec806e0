"""Fashion-Hiernet: hierarchical (LCPN) image classification on EfficientNet backbones.

Modules that need no torch: :mod:`hiernet.hierarchy`, :mod:`hiernet.splits`, :mod:`hiernet.images`,
:mod:`hiernet.paths`, :mod:`hiernet.metrics`, :mod:`hiernet.safeio`.
"""

__version__ = "1.0.0"
