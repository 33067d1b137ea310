"""The one exception type for bad user input: the message names the file and says how to fix it."""


class MoalignError(Exception):
    """A user-facing error: bad input, a missing file, a wrong checkpoint. The CLI prints it without a traceback."""
