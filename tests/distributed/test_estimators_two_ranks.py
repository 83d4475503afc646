"""Tier 2: a group estimator gives the same advantages on 1 and 2 ranks for the same rollout.

The stage keeps each prompt's samples on one rank (each rank samples num_samples_per_prompt
responses to each of its own prompts), so the group baselines are local and only the whitening is a
collective (`collectives.global_whiten`). The probe computes every estimator the way the stage does
from each rank's share of one fixed rollout; the 1-rank reference is the same code in this process
on a one-rank gloo group. Cutting the groups across ranks instead gives different advantages: the
layout the stage keeps is what makes them agree. The 2-rank probe runs in shared_probes.py's
launch."""

import json
import sys

import pytest
import shared_probes  # next to this file
import torch

from launch_util import REPO

PROBE = REPO / "tests" / "distributed" / "estimators_probe.py"
GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline")


def _by_row(parts):
    """{estimator: (rows, R) tensor in row order} from the ranks' reports."""
    names = parts[0].keys()
    out = {}
    for name in names:
        rows = sorted((r for part in parts for r in part[name]), key=lambda r: r[0])
        assert [r[0] for r in rows] == list(range(len(rows)))  # every row exactly once
        out[name] = torch.tensor([r[1:] for r in rows], dtype=torch.float64)
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """estimators_probe.py's report per rank (run in shared_probes.py's 2-rank launch)."""
    folder, rc, stdout, stderr = shared_probes.launched(tmp_path_factory)["estimators"]
    assert rc == 0, stdout[-3000:] + stderr[-3000:]
    return [json.loads((folder / f"estimators.rank{r}").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def one_rank():
    import torch.distributed as dist

    from pipeline.distributed import collectives

    sys.path.insert(0, str(PROBE.parent))
    import estimators_probe

    created = not dist.is_initialized()
    collectives.init_distributed()
    yield {layout: estimators_probe.advantages(0, 1, layout) for layout in ("grouped", "split")}
    if created:
        dist.destroy_process_group()


def test_group_estimators_agree_on_one_and_two_ranks(two_ranks, one_rank):
    single = _by_row([one_rank["grouped"]])
    double = _by_row([r["grouped"] for r in two_ranks])
    for name in (*GROUP_ESTIMATORS, "reinforce_pp", "gae"):
        torch.testing.assert_close(double[name], single[name], rtol=0, atol=1e-9, msg=name)
        assert single[name].abs().sum() > 0, name  # not trivially zero
    # the reference holds no cut groups: its "split" order is only a permutation of the same rows
    torch.testing.assert_close(
        _by_row([one_rank["split"]])["grpo"], single["grpo"], rtol=0, atol=1e-12
    )


def test_groups_cut_across_ranks_would_change_the_advantages(two_ranks, one_rank):
    single = _by_row([one_rank["grouped"]])
    cut = _by_row([r["split"] for r in two_ranks])
    for name in GROUP_ESTIMATORS:
        assert (cut[name] - single[name]).abs().max() > 1e-3, name
    # estimators without groups do not care how rows are laid out
    torch.testing.assert_close(cut["reinforce_pp"], single["reinforce_pp"], rtol=0, atol=1e-9)
