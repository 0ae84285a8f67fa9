"""The checkpoint errors, in a module without imports (the lock tooling loads it without torch)."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read as asked (missing, incomplete, corrupt, wrong shapes)."""
