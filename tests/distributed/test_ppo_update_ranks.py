"""Tier 2: a PPO update on two ranks equals the update on one rank of the same global rollout.

`PPOTrainer._mini_batch` normalises every loss by the global mini-batch token count (an all-reduce)
and backpropagates `loss * world`, because DeepSpeed averages gradients over ranks: the gradient
of an optimizer step is then the gradient of the whole mini-batch's loss, whatever the rank count
and the micro-batching. ppo_update_probe.py builds the real trainer (`PPOTrainer(ctx)`) and runs
`update` on one fixed rollout of 8 rows with one rank (all rows, gradient accumulation 4) and with
two ranks (4 rows each, accumulation 2): two optimizer steps each (two epochs of one mini-batch).
The 2-rank run is one of shared_probes.py's launch (inputs from there too).

What is compared, and why the gradients too: AdamW's step is nearly invariant to a constant scale
of the gradient (m / sqrt(v)), and gradient clipping rescales it anyway, so a wrong `* world`
(removed or doubled: gradients x 0.5 or x 2 on two ranks) barely moves the weights. The gathered
gradient of each step and DeepSpeed's global gradient norm do change by that factor; the weights
after the update check everything else (clipping, the optimizer, the second epoch).

Both engines, and the critic is the one this test caught: its forward is `models.token_values`
(the scalar head at every position), which DeepSpeed 0.19's ZeRO-3 only accumulates over
micro-steps when it runs as the engine's forward (the optimizer's micro-step counter advances in
`DeepSpeedEngine.forward`; at micro-step 0 a gradient is copied, not added). Called on submodules
directly, each micro-step's gradient replaced the previous one, and the critic stepped on its
last micro-batch alone (0.28x the gradient at 4 micro-steps, 0.5x at 2).
`distributed.engines.forward` now runs it as the engine's forward.

A constant factor that does not depend on the rank count (say `* 2 * world`) is the same on both
runs and is not what this test catches; a factor of the wrong power of `world` is.

Tolerances (fp32): the two runs add the same per-token terms in a different order (other
micro-batches, a cross-rank sum), a relative difference of a few 1e-7. Gradients: rtol 1e-5 with
atol 1e-5 x the largest gradient entry of the step (entries that cancel to ~0 carry only rounding).
Weights: rtol 1e-5, atol 1e-5, against updates of about the learning rate (1e-3): AdamW's first
step moves every entry by about the learning rate whatever its gradient, so an entry whose gradient
is at rounding level (5e-10 against 1e-4 elsewhere) moves by an amount rounding decides (measured:
2e-6 at most, in the critic).
"""

import pytest
import shared_probes  # next to this file
import torch
from launch_util import launch


def _report(out, ranks):
    report = torch.load(out, weights_only=False)
    assert report["world_size"] == ranks
    return report


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(the 1-rank report, the 2-rank report): the 2-rank run in shared_probes.py's launch, the
    1-rank one here, each in its own stage folder next to the same inputs."""
    shared = shared_probes.launched(tmp_path_factory)
    work, rc, stdout, stderr = shared["ppo_update"]
    assert rc == 0, stdout[-3000:] + stderr[-3000:]
    two = _report(work / "update.2.pt", 2)
    w1 = shared_probes.linked_inputs(shared["inputs"], work / "w1")
    proc = launch(
        "../tests/distributed/ppo_update_probe.py",
        str(work / "update.1.pt"),
        str(w1),
        num_gpus=1,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return _report(work / "update.1.pt", 1), two


ACTOR_STATS = ("policy_loss", "entropy", "clip_fraction", "approx_kl", "ratio_mean")
CRITIC_STATS = ("value_loss", "value_clip_fraction", "values_mean")


def _compare(one, two, engine):
    for k, w in one["before"][engine].items():  # the same start (both load the same weights)
        assert torch.equal(w, two["before"][engine][k]), (engine, k)
    steps1, steps2 = one["steps"][engine], two["steps"][engine]
    assert len(steps1["grads"]) == len(steps2["grads"]) == 2  # two epochs, one mini-batch each
    for step, (g1, g2) in enumerate(zip(steps1["grads"], steps2["grads"])):
        scale = max(g.abs().max().item() for g in g1.values())
        assert scale > 1e-4, (engine, step)
        for k in g1:
            torch.testing.assert_close(
                g2[k], g1[k], rtol=1e-5, atol=1e-5 * scale, msg=f"{engine} step {step} {k}"
            )
    torch.testing.assert_close(
        torch.tensor(steps2["grad_norms"]), torch.tensor(steps1["grad_norms"]), rtol=1e-5, atol=0
    )
    moved = max(
        (one["after"][engine][k] - w).abs().max().item() for k, w in one["before"][engine].items()
    )
    assert moved > 1e-4, engine  # the update did something
    for k, w in one["after"][engine].items():
        torch.testing.assert_close(
            two["after"][engine][k], w, rtol=1e-5, atol=1e-5, msg=f"{engine} {k}"
        )
    names = ACTOR_STATS if engine == "actor" else CRITIC_STATS
    for k in names:
        assert two["stats"][k] == pytest.approx(one["stats"][k], rel=1e-5, abs=1e-7), k
    # the fixed pi_old and value offsets put rows outside the clip range: clipped terms are compared
    # too
    assert one["stats"]["clip_fraction" if engine == "actor" else "value_clip_fraction"] > 0


def test_two_rank_actor_update_equals_one_rank_update(runs):
    one, two = runs
    assert (
        one["stats"].keys() == two["stats"].keys() == {*ACTOR_STATS, *CRITIC_STATS, "early_stopped"}
    )
    _compare(one, two, "actor")


def test_two_rank_critic_update_equals_one_rank_update(runs):
    _compare(*runs, "critic")
