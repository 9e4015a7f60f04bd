"""Error types. ``tools/run.py`` prints any ``CompressError`` as one line and exits with its code."""


class CompressError(Exception):
    """Base class for every error the user can fix; carries the process exit code."""

    exit_code = 2


class ConfigError(CompressError):
    """A configuration file or override is wrong (unknown key, bad type, bad value)."""


class InputError(CompressError):
    """An input file (image, label file, model file) is missing or malformed."""


class CheckpointError(CompressError):
    """A stage checkpoint or the run manifest is missing, corrupt or inconsistent."""


class GateError(CompressError):
    """A quality gate failed: the compressed model lost more than the configured budget.

    Attributes:
        models: the models that missed (empty when not known); ``compress.backoff`` retries those.
    """

    exit_code = 3

    def __init__(self, message, models=()):
        super().__init__(message)
        self.models = tuple(models)


def run_cli(main, interrupted="interrupted"):
    """Run a command-line ``main()``: a CompressError becomes one line on stderr and its exit code.

    Args:
        main: callable returning the exit code.
        interrupted: what to print on Ctrl-C (exit code 130).
    """
    import sys

    try:
        return main()
    except CompressError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
