"""onnx-gbp: guided backpropagation, deconvnet and vanilla-gradient saliency maps for any CNN in ONNX.

The model's graph gets an explicit backward subgraph of standard ONNX operators, so the maps run on stock
ONNX Runtime (CPU or CUDA) with no framework installed.
"""
__version__ = "0.1.0"

from .errors import (GbpError, InputError, LayerNotFoundError, ModelLoadError, ProviderError,  # noqa: E402
                     UnsupportedModelError)
from .export import export, read_metadata  # noqa: E402
from .methods import METHODS  # noqa: E402
from .runtime import Explainer, Explanation  # noqa: E402
from .targets import TargetSpec  # noqa: E402

__all__ = ["Explainer", "Explanation", "export", "read_metadata", "METHODS", "TargetSpec", "GbpError",
           "InputError", "LayerNotFoundError", "ModelLoadError", "ProviderError", "UnsupportedModelError",
           "__version__"]
