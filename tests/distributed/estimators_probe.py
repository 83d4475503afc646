"""Run under `deepspeed --num_gpus 2` (or in-process with one rank): the advantages of every group
estimator for one fixed rollout, computed as the PPO stage computes them
(`estimators.estimate_advantages` with the all-rank `collectives.global_whiten`), from this rank's
share of the rows. Used by test_estimators_two_ranks.py; writes <folder>/estimators.rank<R> (JSON).

`grouped`: rank r holds prompts r*P..(r+1)*P-1 and all their samples (as the stage's generate()
does); `split`: rank r holds every other row, so each group is cut across the ranks (what must not
happen)."""

import json
import sys
from pathlib import Path

import torch

from pipeline import estimators
from pipeline.distributed import collectives

PROMPTS, SAMPLES, WIDTH = 4, 4, 5
NAMES = ("grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "gae")


def rollout() -> estimators.AdvantageInputs:
    """PROMPTS x SAMPLES rows, prompt-major (row = prompt * SAMPLES + sample), seeded; float64."""
    g = torch.Generator().manual_seed(0)
    rows = PROMPTS * SAMPLES
    lengths = torch.randint(1, WIDTH + 1, (rows,), generator=g)
    mask = (torch.arange(WIDTH)[None] < lengths[:, None]).long()
    rewards = -0.1 * torch.rand(
        rows, WIDTH, generator=g, dtype=torch.float64
    )  # a KL-like penalty per token
    score = torch.randint(
        0, 3, (rows,), generator=g
    ).double()  # few distinct values: ties inside groups
    rewards[torch.arange(rows), lengths - 1] += score
    values = torch.randn(rows, WIDTH, generator=g, dtype=torch.float64)
    groups = torch.arange(PROMPTS).repeat_interleave(SAMPLES)
    return estimators.AdvantageInputs(
        rewards * mask, mask, values=values, group_ids=groups, gamma=1.0, lam=0.95
    )


def rows_of(rank: int, world: int, layout: str) -> torch.Tensor:
    rows = torch.arange(PROMPTS * SAMPLES)
    if layout == "split":
        return rows[rank::world]
    per_rank = PROMPTS // world * SAMPLES
    return rows[rank * per_rank : (rank + 1) * per_rank]


def advantages(rank: int, world: int, layout: str) -> dict:
    """{estimator: [[row, advantages...], ...]} of this rank's rows (whitening on, as by
    default)."""
    full, idx = rollout(), rows_of(rank, world, layout)
    dev = collectives.device()
    mine = estimators.AdvantageInputs(
        full.rewards[idx].to(dev),
        full.response_mask[idx].to(dev),
        values=full.values[idx].to(dev),
        group_ids=full.group_ids[idx].to(dev),
        gamma=full.gamma,
        lam=full.lam,
    )
    out = {}
    for name in NAMES:
        adv, _ = estimators.estimate_advantages(name, mine, True, collectives.global_whiten)
        out[name] = [[int(r), *a] for r, a in zip(idx.tolist(), adv.cpu().tolist())]
    return out


def main() -> None:
    folder = Path([a for a in sys.argv[1:] if not a.startswith("--local_rank")][0])
    d = collectives.init_distributed()
    report = {layout: advantages(d.rank, d.world_size, layout) for layout in ("grouped", "split")}
    (folder / f"estimators.rank{d.rank}").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
