"""What a hostile checkpoint file could hold, for the tests that show hift never unpickles one."""
import os


class RunsCodeWhenUnpickled:
    """Unpickling it runs `touch marker`: a test that finds the marker saw code run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)
