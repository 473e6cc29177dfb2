"""SPIN: Self-Play Fine-Tuning (Chen, Deng, Yuan, Ji & Gu, ICML 2024, arXiv 2401.01335).

The model plays against its previous iterate. In iteration t the chosen response y_w is the
row's dataset completion, the rejected response y_l a sample of the opponent p_t (a frozen
copy of the student taken at the start of the iteration); with
r(y) = Σ_t log q_θ(y_t|x, y_<t) − Σ_t log p_t(y_t|x, y_<t) the loss per pair is

    L = ℓ(λ·(r(y_w) − r(y_l))),   ℓ(h) = log(1 + exp(−h))     (λ = `lam`, default 0.1)

averaged over the pairs. Every `iteration_steps` optimizer steps the opponent is refreshed
to the current student (p_{t+1} ← q_θ); its weights are checkpointed, so a resumed run is
exact (`opd.selfdistill.spin`). Any external teacher the config names is never asked.

Deviations:
- The paper generates y_l for the whole SFT set once per iteration and then trains on that
  fixed set for several epochs; here the opponent samples y_l for each batch on-line, and an
  iteration is `iteration_steps` optimizer steps (default 100, our choice).
- λ = 0.1 follows the β of the authors' DPO-style implementation as reported by secondary
  sources (not verified against their configs).
- The paper's later iterations keep mixing in earlier iterations' synthetic data (not done).
"""

from opd.method import Method
from opd.recipes.registry import recipe
from opd.sampling import dataset
from opd.selfdistill.spin import Opponent, OpponentSamples, SPINLoss
from opd.signals import Paired


@recipe(
    citation="Chen et al., Self-Play Fine-Tuning Converts Weak Language Models to Strong "
    "Language Models (SPIN), ICML 2024 (arXiv 2401.01335)",
    summary="dataset completion chosen, the previous iterate's sample rejected; logistic loss "
    "of λ·(log-ratio margin) to that iterate, refreshed every iteration_steps",
    signal="preference",
    access="self",
    granularity="sequence",
)
def spin(lam: float = 0.1, iteration_steps: int = 100):
    """SPIN with λ = `lam` and an opponent refreshed every `iteration_steps` steps."""
    opponent = Opponent(iteration_steps)
    return Method(
        prefixes=Paired((dataset(), OpponentSamples(opponent))),
        teacher=opponent,
        signal=SPINLoss(lam),
        reduction="sequence_mean",
    )
