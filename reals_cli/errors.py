"""The one exception type that means "the user asked for something that cannot be done".

Library code raises `UserError` with a message that says what is wrong and what to
do about it; the CLI prints that message as one red line and exits with status 2.
Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input (missing file, bad value, incompatible artifact)."""
