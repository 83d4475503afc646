"""The example configs in launch/configs/ load, validate and divide for the world size they are for;
the recipes (ppo, grpo, dr_grpo, rloo, reinforce_pp) alone, on top of the tiny preset, and with a
reward function."""

import pytest

from pipeline.cli import parse_config
from pipeline.config import ppo_sizes
from pipeline.inputs import needed_stages
from launch_util import REPO

EXAMPLES = {
    "tiny.yaml": 1,
    "opt-1.3b-rm-350m-1node.yaml": 8,
    "opt-1.3b-rm-350m-4nodes.yaml": 32,
    "ppo.yaml": 8,
    "grpo.yaml": 8,
    "dr_grpo.yaml": 8,
    "rloo.yaml": 8,
    "reinforce_pp.yaml": 8,
}
RECIPES = {
    "ppo.yaml": ("gae", True),
    "grpo.yaml": ("grpo", False),
    "dr_grpo.yaml": ("dr_grpo", False),
    "rloo.yaml": ("rloo", False),
    "reinforce_pp.yaml": ("reinforce_pp", False),
}  # estimator, critic


def test_every_example_config_is_listed():
    assert sorted(p.name for p in (REPO / "launch" / "configs").glob("*.yaml")) == sorted(EXAMPLES)


@pytest.mark.parametrize("name, world_size", sorted(EXAMPLES.items()))
def test_example_config_is_valid_for_its_world_size(name, world_size):
    cfg = parse_config(["--config", str(REPO / "launch" / "configs" / name)])
    sizes = ppo_sizes(cfg.ppo, world_size)  # raises if the batch sizes do not divide
    assert (
        sizes.rollout_per_rank * world_size
        == cfg.ppo.rollout_batch_size * cfg.ppo.num_samples_per_prompt
    )
    assert needed_stages(cfg, ("sft", "reward", "ppo"))[0] == ("sft", "reward", "ppo")


def test_the_ppo_recipe_is_the_defaults():
    assert parse_config(
        ["--config", str(REPO / "launch" / "configs" / "ppo.yaml")]
    ) == parse_config([])


@pytest.mark.parametrize("name", sorted(RECIPES))
@pytest.mark.parametrize("world_size", [1, 2])
def test_a_recipe_on_the_tiny_preset_and_with_a_reward_function(name, world_size):
    from pipeline.estimators import ADVANTAGE_ESTIMATORS

    configs = REPO / "launch" / "configs"
    tiny, recipe = ["--config", str(configs / "tiny.yaml")], ["--config", str(configs / name)]
    cfg = parse_config(tiny + recipe)
    estimator, critic = RECIPES[name]
    assert (
        cfg.ppo.advantage_mode == estimator
        and ADVANTAGE_ESTIMATORS[estimator].needs_critic == critic
    )
    assert (
        cfg.task.num_prompts == 256 and cfg.ppo.num_iterations == 5
    )  # the preset's options survive the recipe
    ppo_sizes(cfg.ppo, world_size)
    assert (
        parse_config(tiny + recipe + ["--ppo.advantage_mode", "gae"]).ppo.advantage_mode == "gae"
    )  # flags win
    fn = parse_config(
        tiny
        + recipe
        + ["--ppo.reward_model_coef", "0", "--ppo.reward_fn", "pipeline.default_task:gold"]
    )
    assert needed_stages(fn, ("sft", "reward", "ppo"))[0] == (
        "sft",
        "ppo",
    )  # no reward model trained
