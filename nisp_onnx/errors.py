"""The one exception type for problems the user can fix."""


class NispError(Exception):
    """A user error: bad file, bad flag, bad calibration data or an unsupported graph.

    The message is one line that names the file, node or tensor and says what to do.
    """
