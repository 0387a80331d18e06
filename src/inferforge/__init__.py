"""inferforge: make models fast on GPUs without silently making them worse.

Importing the package is cheap on purpose: no CUDA, no transformers, no onnxruntime until a stage uses them.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
