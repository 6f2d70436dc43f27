"""The one exception type exports raise for user-fixable problems."""


class ExportError(RuntimeError):
    """An export cannot be done as asked; the message says what to do about it."""


EXTRA_HINT = "pip install 'captioner[export]'"


def optional_import(module: str, needed_for: str):
    """Import an optional dependency of the ``export`` extra, or say how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ExportError(f"{needed_for} needs the Python package {module.split('.')[0]!r}, which is not installed; {EXTRA_HINT}") from exc
