"""The bias of the Langevin corrector's per-example vs batch norms, by data dimension (README, "sample.py").

With the exact score of N(0.5, 0.25 I), 1000 reverse-diffusion steps + one Langevin step each (snr 0.16) on the VP
SDE in float64, prints the ratio of the samples' variance to the data's for ``corrector_norm=batch`` (score_sde's
means over the batch) and ``example`` (each sample's own norms: samples independent of their batch).

    python bench/corrector_norms.py        # ~2 min on one CPU thread
"""

import argparse

import torch

from scoreflow.sampling import pc_sample
from scoreflow.sde import VPSDE

MU, S = 0.5, 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000, help="reverse-diffusion steps (default 1000)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sde = VPSDE()

    def score(x, t):
        a, sg = (v.reshape(-1, *[1] * (x.ndim - 1)) for v in sde.marginal(t))
        return -(x - a * MU) / (a**2 * S**2 + sg**2)

    print(f"{'D':>5} {'batch':>10} {'example':>10}   (sample variance / data variance)")
    for dim, batch in ((64, 500), (256, 250), (3072, 64)):
        ratio = {}
        for norm in ("batch", "example"):
            x = pc_sample(score, sde, (batch, dim), predictor="reverse_diffusion", corrector="langevin",
                          corrector_norm=norm, steps=args.steps, generator=torch.Generator().manual_seed(0),
                          dtype=torch.float64).samples
            ratio[norm] = x.var(0).mean().item() / S**2
        print(f"{dim:>5} {ratio['batch']:>10.4f} {ratio['example']:>10.4f}", flush=True)


if __name__ == "__main__":
    main()
