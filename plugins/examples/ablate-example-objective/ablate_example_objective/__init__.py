"""A third-party objective for ablate: cross-entropy with label smoothing.

L = (1 − ε)·CE + ε·U, where U = mean over positions of −(1/V)·Σ_v log softmax(z)_v
(the cross-entropy against the uniform distribution). ε = 0 is exactly CE.
"""

import torch
from pydantic import Field

from ablate import hookimpl
from ablate.api import Objective, ObjectiveBatch, ObjectiveResult, Params


class SmoothedCEParams(Params):
    epsilon: float = Field(0.1, ge=0.0, le=1.0, description="label-smoothing weight ε")


class SmoothedCE(Objective):
    name = "smoothed_ce"
    Params = SmoothedCEParams
    description = "cross-entropy with label smoothing ε (example third-party plugin)"

    def formula(self) -> str:
        return f"L = (1−ε)·CE + ε·mean_p[−(1/V)·Σ_v log softmax(z_p)_v], ε = {self.params.epsilon}"

    def __call__(self, batch: ObjectiveBatch) -> ObjectiveResult:
        logp = torch.log_softmax(batch.logits.float(), dim=-1)  # [B, T, V]
        ce = -logp.gather(-1, batch.targets.unsqueeze(-1)).mean()
        uniform = -logp.mean()
        eps = self.params.epsilon
        loss = (1 - eps) * ce + eps * uniform
        return ObjectiveResult(loss, {"ce": ce.detach(), "smoothing": uniform.detach()})


@hookimpl
def ablate_objectives(register):
    register(SmoothedCE)
