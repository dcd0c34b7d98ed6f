"""Errors a user can see: each says in one line what went wrong and what to do about it."""


class MLCEngineError(Exception):
    """Base of every error mlc-engine raises on purpose."""


class DeviceError(MLCEngineError, ValueError):
    """A device string that does not parse, or names a device this machine cannot use."""


class ModelNotFoundError(MLCEngineError):
    """A model name that matches no model folder on the search paths."""


class ModelLibraryError(MLCEngineError):
    """A model library that does not match the model folder it is asked to run."""
