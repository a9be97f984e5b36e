"""One exception type for user errors: the CLI prints its message on one line and exits 2."""


class MeshlmError(Exception):
    """A problem with the user's input (unknown model, bad mesh, malformed file...)."""
