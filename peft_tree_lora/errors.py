"""The one exception type for problems with what a user asked for (a bad option, a missing file, a model that does
not fit). The command line prints it as a single line and exits with status 2; library callers can catch it as a
`ValueError`."""


class TreeLoraUsageError(ValueError):
    """A problem with the user's input, stated so that it says what is wrong and what is allowed."""
