"""The one error type users see: a problem and the fix, never a TensorFlow traceback."""


class GraphQuantError(Exception):
    """A problem with the user's input or request, stated with how to fix it.

    ``problem`` says what is wrong, ``fix`` what to do about it.  ``str(err)``
    gives both on one line each, which is what the CLI prints.
    """

    def __init__(self, problem: str, fix: str = ""):
        self.problem = problem
        self.fix = fix
        super().__init__(problem + (f"\n  fix: {fix}" if fix else ""))


class InvalidGraphError(GraphQuantError):
    """The file is not a usable frozen GraphDef (corrupt, truncated, dangling inputs...)."""


class NotFrozenError(InvalidGraphError):
    """The graph still holds variables."""


class NodeNotFoundError(GraphQuantError):
    """A node or tensor name given by the user does not exist in the graph."""


class OutputPathError(GraphQuantError):
    """The output path cannot be written (is the input, a directory, unwritable)."""


class CalibrationDataError(GraphQuantError):
    """Calibration or validation data that cannot be used as given."""


class UnsupportedGraphError(GraphQuantError):
    """A graph construct we cannot handle (for example a shape we cannot express)."""
