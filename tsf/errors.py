"""User-facing errors: bad configuration is reported in one line, without a traceback."""


class ConfigError(ValueError):
    """A configuration or input the user can fix (unknown name, out-of-range value, ...)."""

    #: messages raised in this process; the CLI reports the one a config parser wrapped
    #: in its own diagnostics plainly (see ``tsf.cli.TsfArgumentParser``)
    raised: list = []

    def __init__(self, message: str) -> None:
        super().__init__(message)
        ConfigError.raised.append(str(message))
