"""Typed errors. The library raises these; the CLI turns each into one line and its type's exit
code. Every message says what was wrong and how to fix it.

The exit codes are declared here, once (EXIT_CODES); `sdconv --help` and docs/reliability.md
list them.
"""

SUCCESS, VERIFY_FAILED, INTERRUPTED = 0, 1, 130
EXIT_CODES = {
    SUCCESS: "success",
    VERIFY_FAILED: "verification failed",
    2: "usage",
    3: "unreadable input",
    4: "refused as unsafe",
    5: "layout not found/ambiguous",
    6: "output refused (exists without --force, or is the input)",
    7: "a remote input could not be read (network, HTTP error, no byte ranges)",
    INTERRUPTED: "interrupted (Ctrl-C, SIGTERM): nothing was written",
}


class SdconvError(Exception):
    exit_code = 3

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class UsageError(SdconvError):
    exit_code = 2


class InputError(SdconvError):
    """The input cannot be read, or holds something the engine cannot use."""
    exit_code = 3


class UnsafeInputError(SdconvError):
    exit_code = 4


class LayoutError(SdconvError):
    """No layout (or not the requested one) explains the file."""
    exit_code = 5


class OutputError(SdconvError):
    exit_code = 6


class RemoteError(SdconvError):
    """A URL or hf:// input could not be read: the network, the server's answer, its access rules."""
    exit_code = 7


class MappingError(SdconvError):
    """A mapping YAML file is malformed. Names the file and line."""
    exit_code = 2

    def __init__(self, path, line, message: str, hint: str | None = None):
        where = f"{path}:{line}" if line else str(path)
        super().__init__(f"{where}: {message}", hint)
        self.path, self.line = path, line


class MalformedInputError(InputError):
    """Text an input (or sdconv's own record) holds is not what it must be: a field of the wrong
    type or out of range, JSON too large or too deep. The message names the file and the field;
    `detail` says what is wrong without them."""

    def __init__(self, message: str, hint: str | None = None, *, detail: str | None = None):
        super().__init__(message, hint)
        self.detail = detail or message
