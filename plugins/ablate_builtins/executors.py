"""Built-in executors, registered through the entry-point group like any third-party plugin."""

from ablate import hookimpl
from ablate.executors import LocalExecutor


@hookimpl
def ablate_executors(register):
    register(LocalExecutor)
