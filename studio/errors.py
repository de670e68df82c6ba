"""Errors the user sees. Each message names the problem and where, and never holds a secret."""


class StudioError(Exception):
    """A problem the user can act on; `str(error)` is the message shown in the UI and the CLI."""


class ModelBusyError(StudioError):
    """The model is doing something else (loading, generating, training)."""


class ModelNotLoadedError(StudioError):
    """An action needs a loaded model and none is loaded."""


class ModelLoadError(StudioError):
    """A model or tokenizer could not be loaded; the message says why and what to do."""


class AdapterError(StudioError):
    """An adapter folder is missing, damaged or made for another base model."""


class DataError(StudioError):
    """A document or dataset could not be read; the message names the file and line."""


class PermissionDenied(StudioError):
    """The current access policy does not allow this action."""
