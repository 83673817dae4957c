"""The one exception type that means "the user asked for something that cannot be done".

Library code raises `UserError` with a message that says what is wrong and what to
do about it; the CLI prints that message as one red line and exits with status 2.
Anything else is a bug and keeps its traceback. `Interrupted` is a KeyboardInterrupt that
says what was kept (a training run stopped by Ctrl-C or SIGTERM); the CLI exits 128 + the
signal's number with it, as a shell reports a process that the signal killed: 130 for Ctrl-C,
143 for SIGTERM.
"""

import signal


class UserError(Exception):
    """A problem with the user's input (missing file, bad value, incompatible artifact)."""


class Interrupted(KeyboardInterrupt):
    """Stopped by a signal after saving what lets the job continue; the message says how."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = int(signum)
