"""Models: Vim and its mixer, the timm registry, weight files, and the dense-prediction heads built on it.

Imports ``ops`` only. Importing this package registers the timm entrypoints.
"""
from visionmamba.models import registry  # noqa: F401  (registers the timm entrypoints)
