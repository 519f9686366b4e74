"""One base for errors caused by the user's input or data (a wrong model id, an unknown persona, an
empty distill set ...): the CLI prints their message as one clear line instead of a traceback."""


class PrismError(Exception):
    """Raised for problems the user can fix; the message says what was wrong and what to change."""
