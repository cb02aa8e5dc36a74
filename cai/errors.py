"""The one exception type the CLI turns into a single clear line and a non-zero exit."""


class CaiError(Exception):
    """A problem the user can fix (bad config, missing file, bad data): printed as one line."""
