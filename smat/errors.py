"""User-facing errors: one line that names the file or field and says what to do."""


class SmatError(Exception):
  """Base class for errors that the CLI prints as a single `error:` line."""


class DataError(SmatError):
  """Bad data input: unknown spec, missing files, unusable classes or images."""


class SamplerError(SmatError):
  """Sampler settings that no episode of the given domain can satisfy."""


def require(module: str, extra: str, needed_for: str):
  """Import an optional dependency, or stop with the one line that installs it."""
  import importlib

  try:
    return importlib.import_module(module)
  except ImportError:
    raise SmatError(f"{needed_for} needs {module.split('.')[0]}, which this install lacks: "
                    f"pip install 'smat[{extra}]' (or 'smat[all]')") from None
