"""The one error type the command line turns into a single clear line."""


class UserError(Exception):
    """Bad input from the user: a wrong path, a corrupt checkpoint, an unknown
    preset, a prompt longer than the context.  The message names the culprit."""
