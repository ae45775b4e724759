"""The one error type a user sees.

Anything the user can fix (a bad flag, a missing file, a malformed dataset) raises
``XdlError``; the CLI prints its message as one line on stderr and exits with code 2.
Everything else is a bug and keeps its traceback.
"""


class XdlError(Exception):
    """A problem with the user's input, reported as one clear line (CLI exit code 2)."""
