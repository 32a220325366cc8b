"""Built-in executors, registered through the entry-point group like any third-party plugin."""

from ablate import hookimpl
from ablate.executors import LocalExecutor
from ablate.ray_executor import RayExecutor  # imports Ray only when it runs


@hookimpl
def ablate_executors(register):
    register(LocalExecutor)
    register(RayExecutor)
