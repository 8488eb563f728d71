"""The error types users see: raised anywhere, reported by the CLI entry in a single line.

The exit status follows the kind (`cli.run`): a `ConfigError` exits 2, any other `UserError` 1, Ctrl-C 130.
"""


class UserError(Exception):
    """A problem the user can fix (bad config, missing file, no network, ...).

    The message must say what went wrong and what to do about it, in one line. Raised while a command runs, it
    exits with status 1.
    """


class ConfigError(UserError):
    """A bad command line, config file or config value: the command cannot start as asked (exit status 2)."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, after the command has already said what it saved and how to go on."""
