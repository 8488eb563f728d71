"""The error types users see: raised anywhere, reported by the CLI entry in a single line."""


class UserError(Exception):
    """A problem the user can fix (bad config, missing file, no network, ...).

    The message must say what went wrong and what to do about it, in one line.
    """


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, after the command has already said what it saved and how to go on."""
