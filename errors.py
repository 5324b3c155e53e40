"""The one error type the command line turns into a single clear line."""


class UserError(Exception):
    """Bad input from the user: a wrong path, a corrupt checkpoint, an unknown
    preset, a prompt longer than the context.  The message names the culprit."""


class BrokenTool(UserError):
    """An emulator or check tool is installed but does not work: our own code
    (launcher, add-on, sysroot) or the installed driver failed.  Never a
    reason to skip."""
