"""The one exception type for mistakes a user can make (bad path, bad config, bad request).

The CLI prints its message as one sentence and exits non-zero, without a traceback.
"""


class CogniError(Exception):
    """A user-facing error: the message says what was wrong and what to do."""
