"""Exit statuses and the exceptions that carry them.

Every kp-* command maps failures to an exit status here and nowhere else.
The table is part of the public contract (see kodepipe(7)); numbers never
change meaning once released.
"""

from __future__ import annotations

# Exit statuses.  The sysexits.h numbers where one fits.
OK = 0
FAILED = 1  # some records failed; each failed record carries an "error" object
USAGE = 2  # bad arguments or options (click's own usage errors use 2 as well)
BAD_INPUT = 65  # EX_DATAERR: a stdin line that is not a JSON object, or a record with invalid fields
UNAVAILABLE = 69  # EX_UNAVAILABLE: a required program is missing
SOFTWARE = 70  # EX_SOFTWARE: a bug in kodepipe (a traceback follows)
TIMEOUT = 75  # EX_TEMPFAIL: timed out waiting; trying again may work
NO_PERMISSION = 77  # EX_NOPERM: the operation needs privileges the user lacks
INTERRUPTED = 130  # SIGINT
TERMINATED = 143  # SIGTERM
PIPE_CLOSED = 141  # the reader of stdout went away (as if killed by SIGPIPE)

EXIT_STATUSES: list[tuple[int, str]] = [
    (OK, "success: every record was handled"),
    (FAILED, "some records failed; each carries an error object and the rest were still handled"),
    (USAGE, "usage error: unknown option, bad argument, hostile name on the command line"),
    (BAD_INPUT, "bad input: a line on stdin that is not a JSON object, or a record with an invalid field; "
     "the line is named by number and nothing is changed for it"),
    (UNAVAILABLE, "a program that the command needs (qemu-img, debootstrap, ...) is not installed"),
    (SOFTWARE, "internal error in kodepipe: please report it with the traceback"),
    (TIMEOUT, "timed out waiting for something (a lock, a VM); trying again may work"),
    (NO_PERMISSION, "the operation needs privileges the user lacks (building an image needs root)"),
    (INTERRUPTED, "interrupted (SIGINT); work in progress was rolled back"),
    (PIPE_CLOSED, "the reader of stdout went away (for example | head -1); no message is printed"),
    (TERMINATED, "terminated (SIGTERM); work in progress was rolled back"),
]

# When several records fail in different ways, the command exits with the
# status that comes first in this order.
_SEVERITY = [UNAVAILABLE, NO_PERMISSION, BAD_INPUT, TIMEOUT, FAILED]


def worst(statuses: set[int]) -> int:
    for status in _SEVERITY:
        if status in statuses:
            return status
    return OK


class KpError(Exception):
    """A failure with a short machine-readable code and a human message.

    ``code`` goes into the record's ``error.code``; ``status`` is the exit
    status it contributes.  The message should say what happened and what
    to do about it.
    """

    code = "failed"
    status = FAILED

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None,
                 hint: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.hint = hint

    @property
    def message(self) -> str:
        text = str(self.args[0]) if self.args else self.code
        return f"{text}; {self.hint}" if self.hint else text

    def as_error(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class BadInput(KpError):
    code = "bad_input"
    status = BAD_INPUT


class BadName(BadInput):
    code = "bad_name"


class NotFound(KpError):
    code = "not_found"


class Exists(KpError):
    code = "exists"


class Busy(KpError):
    code = "busy"
    status = TIMEOUT


class InUse(KpError):
    code = "in_use"


class MissingProgram(KpError):
    code = "missing_program"
    status = UNAVAILABLE


class NoPermission(KpError):
    code = "no_permission"
    status = NO_PERMISSION


class Timeout(KpError):
    code = "timeout"
    status = TIMEOUT


class CommandFailed(KpError):
    """An external program exited non-zero; the message carries its output."""

    code = "command_failed"


class Interrupted(BaseException):
    """Raised from the SIGTERM handler so that cleanup code runs."""

    status = TERMINATED
