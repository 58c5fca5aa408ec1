"""User-facing errors.

Everything a user can cause (a bad path, a broken checkpoint, an unsupported config) raises a
LowbitError subclass; the CLI prints its message on one line and exits 2, never a traceback.
"""


class LowbitError(Exception):
    """Base class for errors caused by the user's input rather than by a bug in lowbit."""


class ConfigError(LowbitError):
    """config.json / quantization config missing, malformed or unsupported."""


class CheckpointError(LowbitError):
    """The tensors on disk do not match what the model and its quantization config expect.

    Holds every violation found, not only the first, so one run shows the whole picture.
    """

    def __init__(self, problems: list[str], header: str = "checkpoint does not load"):
        self.problems = list(problems)
        lines = [f"{header}: {len(self.problems)} problem(s)"]
        lines += [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))
