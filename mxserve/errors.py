"""User-facing errors: the CLI prints these as one line and exits with code 2."""


class MxServeError(Exception):
    """An error caused by the user's input (bad flag, missing file, impossible budget)."""
