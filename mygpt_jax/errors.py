"""The one error type users see: raised anywhere, printed by the CLI entry as a single line."""


class UserError(Exception):
    """A problem the user can fix (bad config, missing file, no network, ...).

    The message must say what went wrong and what to do about it, in one line.
    """
