"""The one exception type the CLI turns into a single clear line and exit code 2."""


class UserError(Exception):
    """Bad input from the user (missing file, out-of-range target, unknown option).

    Raised anywhere in the library; the CLI prints its message without a traceback, because the fix is
    on the user's side and a stack trace would only hide the one line that matters.
    """
