"""The one usage error of the command line (exit code 2), in a module of its own: `python -m
osteoscreen.cli` runs cli as __main__, and a class defined there would not be the one that
cli_tools and cli_calibrate raise."""


class UsageError(Exception):
    """Bad arguments or input files: exit code 2 with a message, no traceback."""
