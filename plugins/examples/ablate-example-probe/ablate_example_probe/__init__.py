"""A third-party probe for ablate: how often the trained cell's next token is among its k most
likely, and how large each injection is. It reads the cell only through ablate.api's CellView and
StudentView, so it works on any student ablate trains.

    next_token_topk_acc = #{positions whose next token is among the top-k logits} / #positions
    inj_rms_L{l}        = √(mean over batches of mean over B·T·d entries of inj_l²)
"""

from pydantic import Field

from ablate.api import CellView, Metric, Params, Probe, hookimpl

SECTION = "next-token accuracy (example probe)"


class NextTokenParams(Params):
    k: int = Field(1, ge=1, description="a hit when the next token is among the k most likely tokens")


class NextTokenAccuracy(Probe):
    name = "next-token-accuracy"
    Params = NextTokenParams
    scope = "cell"
    description = "Top-k next-token accuracy on the probe batches, and the RMS size of each injection"
    metrics = (
        Metric("next_token_topk_acc", "fraction of probe positions whose next token is among the cell's k most "
                                      "likely tokens (k: [probes.next-token-accuracy] k, default 1)",
               unit="fraction, in [0, 1]", section=SECTION),
        Metric("inj_rms_L{l}", "root-mean-square entry of the gated injection after layer l on the probe batches",
               unit="activation units", section=SECTION),
    )

    def run(self, view: CellView) -> dict[str, float]:
        hits = total = 0
        squares: dict[int, list[float]] = {}
        for i, batch in enumerate(view.val_batches):            # batch [B, T+1]
            trace = view.student.trace(view.inputs(i))          # logits [B, T, V]; layers {l: InjectionTrace}
            targets = batch[:, 1:].to(trace.logits.device)      # [B, T]
            top = trace.logits.topk(self.params.k, dim=-1).indices  # [B, T, k]
            hits += int((top == targets.unsqueeze(-1)).any(dim=-1).sum())
            total += targets.numel()
            for layer, t in trace.layers.items():
                squares.setdefault(layer, []).append(float(t.inj.float().pow(2).mean()))  # inj [B, T, d]
        out = {"next_token_topk_acc": hits / total}
        out.update({f"inj_rms_L{layer}": (sum(v) / len(v)) ** 0.5 for layer, v in squares.items()})
        return out


@hookimpl
def ablate_probes(register):
    register(NextTokenAccuracy)
