"""The one exception type the search layer raises for user-fixable problems."""


class SearchError(RuntimeError):
    """An index or query problem; the message says what to do about it."""
