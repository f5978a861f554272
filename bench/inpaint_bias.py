"""How far replacement imputation (Song et al. 2021, App. I.2) is from the exact conditional on correlated pixels.

Two-pixel Gaussian data, variance 0.25 each, correlation 0.9; pixel 0 known (= 0.5), pixel 1 imputed with the exact
score, 4000 samples, 500 steps, float64. The exact conditional is N(0.45, 0.0475). Prints the imputed pixel's mean
and variance per SDE and corrector (README, "Correctness: what the tests prove").

    python bench/inpaint_bias.py        # ~1 min on one CPU thread
"""

import argparse

import torch

from scoreflow.sampling import inpaint
from scoreflow.sde import VESDE, VPSDE

RHO, VAR, KNOWN = 0.9, 0.25, 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=500, help="predictor steps (default 500)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cov = torch.tensor([[1.0, RHO], [RHO, 1.0]], dtype=torch.float64) * VAR
    print(f"exact conditional: mean {RHO * KNOWN:.4f}, variance {VAR * (1 - RHO**2):.4f}")
    for sde in (VPSDE(), VESDE()):

        def score(x, t, sde=sde):
            a, s = sde.marginal(t)
            marg = a[:, None, None] ** 2 * cov + s[:, None, None] ** 2 * torch.eye(2, dtype=x.dtype)
            return -torch.linalg.solve(marg, x.unsqueeze(-1)).squeeze(-1)

        y = torch.zeros(4000, 2, dtype=torch.float64)
        y[:, 0] = KNOWN
        mask = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
        for corrector in ("none", "langevin"):
            x = inpaint(score, sde, y, mask, steps=args.steps, corrector=corrector,
                        generator=torch.Generator().manual_seed(0)).samples[:, 1]
            print(f"{type(sde).__name__:6} corrector={corrector:9} mean {x.mean():.4f} ± {x.std() / 4000**0.5:.4f}, "
                  f"variance {x.var():.4f}", flush=True)


if __name__ == "__main__":
    main()
