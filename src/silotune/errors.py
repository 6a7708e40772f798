"""Errors a user can cause; the CLI prints their message and exits with code 2."""


class UserError(Exception):
    """A mistake in a config, a path or the data that the user can fix; the message says how."""


class ConfigError(UserError):
    """A config key, value or combination is invalid."""


class DataError(UserError):
    """A data file or its contents cannot be used as configured."""


class FrameRejected(UserError):
    """A transport frame or handshake message failed its format, order or integrity check."""
