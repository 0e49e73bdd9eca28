"""Errors that the command line reports as one clear message and a non-zero exit."""


class QcgateError(Exception):
    """A failure the user can act on; its message names the problem (file, key, value)."""


class ConfigError(QcgateError):
    """A configuration file or flag is missing, malformed, or holds a bad value."""


class InputError(QcgateError):
    """An input file or directory is missing, malformed, or inconsistent."""
