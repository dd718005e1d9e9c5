"""Exceptions for what the user can fix, and the exit codes the command line maps them to."""

EXIT_OK = 0
EXIT_USER = 2  # bad file, bad flag, bad calibration data, unsupported graph (argparse uses 2 too)
EXIT_GATE = 3  # the model was pruned but a quality gate failed
EXIT_INTERNAL = 4  # a bug in nisp-onnx


class NispError(Exception):
    """A user error: bad file, bad flag, bad calibration data or an unsupported graph.

    The message is one line that names the file, node or tensor and says what to do.
    """


class GateFailed(NispError):
    """The pruned model missed a quality gate; `report` says by how much."""

    def __init__(self, message: str, report: object):
        super().__init__(message)
        self.report = report
