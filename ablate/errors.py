"""User-facing errors. Each carries one paragraph naming the thing and the fix; the CLI prints
it without a traceback (unless --debug) and exits with `exit_code`."""


class AblateError(Exception):
    """Bad input: a spec, file, checkpoint or plugin the user must fix. Exit code 2."""

    exit_code = 2


class SpecError(AblateError):
    """The spec is invalid. `problems` lists (location, message) pairs, all reported at once."""

    def __init__(self, problems: list[tuple[str, str]], source: str = "spec"):
        self.problems = problems
        self.source = source
        lines = [f"{source}: {len(problems)} problem(s)"]
        lines += [f"  - {loc}: {msg}" if loc else f"  - {msg}" for loc, msg in problems]
        super().__init__("\n".join(lines))


class InputError(AblateError):
    """A missing or incompatible input (file, weights, vocabulary, corrupt artifact)."""


class DivergedError(AblateError):
    """A stage's own training (backbone or teacher pretraining) produced a non-finite loss. Exit 1:
    the input was valid, the run failed; earlier stages stay cached."""

    exit_code = 1


class NumericalFault(Exception):
    """A NaN/inf loss or gradient inside a cell: that cell stops, others still run."""

    def __init__(self, cell: str, step: int, what: str):
        self.cell, self.step, self.what = cell, step, what
        super().__init__(f"cell {cell!r}: non-finite {what} at step {step}")


class PluginFault(Exception):
    """A plugin's own code raised (an objective's constructor or step, a probe): only the cells or
    metrics that need that plugin fail; the run goes on."""

    def __init__(self, kind: str, name: str, where: str, exc: BaseException):
        self.kind, self.name, self.where, self.exc = kind, name, where, exc
        super().__init__(f"{kind} plugin {name!r} raised {type(exc).__name__} {where}: {exc}")


class RunFailed(AblateError):
    """An unexpected exception stopped a run. Exit code 1: the message says where it happened,
    what is kept and how to resume; the traceback is in `log` (and shown with --debug)."""

    exit_code = 1

    def __init__(self, message: str, log: str | None = None):
        self.log = log
        super().__init__(message)


class Interrupted(Exception):
    """SIGINT/SIGTERM: finished work is kept, the running cell saved its state. Exit code 130."""

    exit_code = 130
