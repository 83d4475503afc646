"""The three stages, each a `run(ctx)`: sft.py, reward.py, and PPO (ppo.py: the algorithm, one
method per phase; ppo_setup.py: its construction; ppo_reward.py: the reward of a rollout;
ppo_eval.py: metrics, evaluation, summary; ppo_types.py: the containers between phases).
common.py is what they share."""
