"""The example configs in launch/configs/ load, validate and divide for the world size they are for."""
import pytest

from pipeline.config import parse_config, ppo_sizes
from pipeline.orchestrator import needed_stages
from launch_util import REPO

EXAMPLES = {"tiny.yaml": 1, "opt-1.3b-rm-350m-1node.yaml": 8, "opt-1.3b-rm-350m-4nodes.yaml": 32}


def test_every_example_config_is_listed():
    assert sorted(p.name for p in (REPO / "launch" / "configs").glob("*.yaml")) == sorted(EXAMPLES)


@pytest.mark.parametrize("name, world_size", sorted(EXAMPLES.items()))
def test_example_config_is_valid_for_its_world_size(name, world_size):
    cfg = parse_config(["--config", str(REPO / "launch" / "configs" / name)])
    sizes = ppo_sizes(cfg.ppo, world_size)  # raises if the batch sizes do not divide
    assert sizes["rollout_per_rank"] * world_size == cfg.ppo.rollout_batch_size
    assert needed_stages(cfg, ("sft", "reward", "ppo"))[0] == ("sft", "reward", "ppo")
