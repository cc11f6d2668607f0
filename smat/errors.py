"""User-facing errors: one line that names the file or field and says what to do."""


class SmatError(Exception):
  """Base class for errors that the CLI prints as a single `error:` line."""


class DataError(SmatError):
  """Bad data input: unknown spec, missing files, unusable classes or images."""


class SamplerError(SmatError):
  """Sampler settings that no episode of the given domain can satisfy."""
