"""Errors caused by the user's input or data (a wrong model id, an unknown persona, a value out of
range, a broken checkpoint ...): every command prints their message as one ``error: ...`` line and
exits 2 instead of showing a traceback."""


class PrismError(Exception):
    """Raised for problems the user can fix; the message says what was wrong and what to change."""


class ConfigError(PrismError, ValueError):
    """A setting out of range or naming something that does not exist; raised before long work."""


def require(condition: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(message)
