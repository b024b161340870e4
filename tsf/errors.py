"""User-facing errors: bad configuration is reported in one line, without a traceback."""


class ConfigError(ValueError):
    """A configuration or input the user can fix (unknown name, out-of-range value, ...)."""
