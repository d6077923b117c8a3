"""The one exception type for bad user input (recipe, data files, CLI): printed as one line, exit code 2."""


class InputError(Exception):
    """A problem with what the user gave us; the message names the field, file or row and fits on one line."""
