"""Built-in executors, registered through the entry-point group like any third-party plugin."""

from ablate.api import LocalExecutor, RayExecutor, hookimpl  # RayExecutor imports Ray only when it runs


@hookimpl
def ablate_executors(register):
    register(LocalExecutor)
    register(RayExecutor)
