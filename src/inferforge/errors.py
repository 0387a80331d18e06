"""Errors a user can cause. Each message names the input at fault and, where one exists, the fix.

The CLI turns these into one line and a non-zero exit; the servers turn them into a 4xx in the protocol's
shape.
"""


class InferforgeError(Exception):
    """Base of every error a user can cause (bad flag, bad file, bad request)."""


class ModelSourceError(InferforgeError):
    """The model source cannot be found, read or trusted."""


class DataError(InferforgeError):
    """The evaluation data cannot be read or does not fit the model."""


class TechniqueError(InferforgeError):
    """A technique name or configuration is unknown or invalid."""


class NotApplicable(InferforgeError):
    """A technique does not apply to this model, device or dtype; the message says why."""


class BudgetError(InferforgeError):
    """No candidate met the quality budget."""


class ArtifactError(InferforgeError):
    """An artifact folder is missing, incomplete or does not match its manifest."""
