"""User reward / evaluation functions (pipeline/reward_fns.py) and their options."""

import pytest

from pipeline import reward_fns
from pipeline.cli import parse_config
from pipeline.errors import UserError

FUNCS = """
import math
def length(prompts, responses):
    return [float(len(r.split())) for r in responses]
def as_array(prompts, responses):
    import numpy
    return numpy.arange(len(responses), dtype=float)
def as_tensor(prompts, responses):
    import torch
    return torch.ones(len(responses))
def short(prompts, responses):
    return [1.0] * (len(responses) - 1)
def nan_on_empty(prompts, responses):
    return [math.nan if not r else 1.0 for r in responses]
def boom(prompts, responses):
    for r in responses:
        if "bad" in r:
            raise ValueError("cannot score " + r)
    return [0.0] * len(responses)
def batch_only(prompts, responses):
    if len(responses) > 1:
        raise RuntimeError("too many")
    return [0.0]
def strings(prompts, responses):
    return ["1"] * len(responses)
def scalar(prompts, responses):
    return 3.0
NOT_A_FUNCTION = 3
"""


@pytest.fixture
def funcs(tmp_path):
    path = tmp_path / "my_task.py"
    path.write_text(FUNCS)
    return path


def test_file_function_is_called_batched(funcs):
    fn = reward_fns.load(f"{funcs}:length", "ppo.reward_fn")
    assert fn(["p", "q"], ["a b c", ""]) == [3.0, 0.0]


@pytest.mark.parametrize("name, expected", [("as_array", [0.0, 1.0]), ("as_tensor", [1.0, 1.0])])
def test_arrays_and_tensors_are_accepted(funcs, name, expected):
    assert reward_fns.load(f"{funcs}:{name}", "ppo.reward_fn")(["p", "q"], ["a", "b"]) == expected


def test_module_function_default_task_gold():
    fn = reward_fns.load(reward_fns.DEFAULT_TASK_GOLD, "ppo.eval_reward_fn")
    prompt = "ana asks for a review of the pizza ."
    assert fn([prompt, prompt], ["the pizza is amazing .", "the movie is amazing ."]) == [1.0, 0.0]


@pytest.mark.parametrize(
    "spec, words",
    [
        ("no_colon", "expected FILE.py:NAME"),
        ("file.py:", "expected FILE.py:NAME"),
        (":name", "expected FILE.py:NAME"),
        ("missing_file.py:gold", "does not exist"),
        ("no_such_module_xyz:gold", "no module 'no_such_module_xyz'"),
    ],
)
def test_malformed_or_missing_specs_are_refused(spec, words):
    with pytest.raises(UserError, match="option ppo.reward_fn") as e:
        reward_fns.load(spec, "ppo.reward_fn")
    assert words in str(e.value)


def test_missing_name_and_non_callable(funcs):
    with pytest.raises(UserError, match="has no function 'nope'"):
        reward_fns.load(f"{funcs}:nope", "ppo.reward_fn")
    with pytest.raises(UserError, match="NOT_A_FUNCTION is a int"):
        reward_fns.load(f"{funcs}:NOT_A_FUNCTION", "ppo.reward_fn")


def test_a_module_that_fails_to_import_is_reported(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("import no_such_package_xyz\n")
    with pytest.raises(UserError, match=r"importing .*broken.py raised ModuleNotFoundError"):
        reward_fns.load(f"{path}:gold", "ppo.eval_reward_fn")


def test_wrong_length_names_the_counts(funcs):
    fn = reward_fns.load(f"{funcs}:short", "ppo.reward_fn")
    with pytest.raises(UserError, match=r"short returned 2 values for 3 rows"):
        fn(["a", "b", "c"], ["x", "y", "z"])


def test_non_finite_value_names_the_row(funcs):
    fn = reward_fns.load(f"{funcs}:nan_on_empty", "ppo.reward_fn")
    with pytest.raises(UserError, match=r"returned nan for row 1 \(prompt 'q', response ''\)"):
        fn(["p", "q"], ["fine", ""])


@pytest.mark.parametrize(
    "name, words", [("strings", "returned '1' for row 0"), ("scalar", "returned float, not a list")]
)
def test_non_numbers_are_refused(funcs, name, words):
    with pytest.raises(UserError, match=words):
        reward_fns.load(f"{funcs}:{name}", "ppo.reward_fn")(["p"], ["r"])


def test_an_exception_names_the_first_failing_row(funcs):
    fn = reward_fns.load(f"{funcs}:boom", "ppo.reward_fn")
    with pytest.raises(UserError) as e:
        fn(["p0", "p1", "p2"], ["good", "bad one", "bad two"])
    text = str(e.value)
    assert "boom raised ValueError: cannot score bad one" in text
    assert "row 1 alone raises too: prompt 'p1', response 'bad one'" in text


def test_an_exception_of_the_whole_batch_only_says_so(funcs):
    fn = reward_fns.load(f"{funcs}:batch_only", "ppo.reward_fn")
    with pytest.raises(UserError, match="no single row raises alone"):
        fn(["p", "q"], ["a", "b"])


# ---------------------------------------------------------------- options
def test_options_parse_and_default_off():
    cfg = parse_config([])
    assert cfg.ppo.reward_fn == "" and cfg.ppo.eval_reward_fn == "" and cfg.ppo.select_best == ""
    assert cfg.reward.ensemble_size >= 1 and cfg.ppo.reward_model_coef == 1.0


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--ppo.reward_model_coef", "0"], "leaves no reward"),
        (
            [
                "--ppo.reward_fn",
                "f.py:g",
                "--ppo.reward_model_coef",
                "0",
                "--ppo.reward_model_path",
                "rm",
            ],
            "uses no reward model",
        ),
        (["--reward.ensemble_size", "1", "--ppo.ensemble_penalty", "1"], "train an ensemble"),
        (["--reward.ensemble_size", "0"], "reward.ensemble_size=0 must be >= 1"),
        (
            ["--reward.ensemble_size", "3", "--ppo.reward_model_path", "rm"],
            "scores with one given model",
        ),
        (["--ppo.reward_fn", "gold"], "ppo.reward_fn='gold': expected FILE.py:NAME"),
        (["--ppo.eval_reward_fn", "x.py:1a"], "ppo.eval_reward_fn='x.py:1a'"),
        (["--ppo.reward_fn_coef", "nan", "--ppo.reward_fn", "f.py:g"], "finite"),
        (["--ppo.kl_alarm", "-1"], "ppo.kl_alarm=-1.0 must be >= 0"),
        (["--task.num_eval", "600"], "task.num_eval=600 must be <= 576"),
        (["--ppo.select_best", "gold"], "ppo.select_best='gold': expected an evaluation metric"),
        (
            ["--ppo.score_norm", "zscore"],
            "ppo.score_norm='zscore': expected one of none, sft, running",
        ),
    ],
)
def test_bad_reward_options_are_refused(argv, words):
    with pytest.raises(UserError, match=words.replace("(", r"\(").replace(")", r"\)")):
        parse_config(argv)


def test_help_lists_inherited_comments():
    from pipeline.cli import build_parser

    text = build_parser("x").format_help()
    assert "--reward.ensemble_size" in text and "reward models trained" in text
    # a TrainConfig field of the reward section keeps its help text
    section = text.split("--reward.epochs REWARD.EPOCHS\n", 1)[1].split("--reward.max_steps", 1)[0]
    assert "passes over the training set" in section


# ---------------------------------------------------------------- which stages run, what PPO reads
def test_reward_function_alone_needs_no_reward_stage(tmp_path):
    from pipeline.inputs import STAGES, needed_stages, stage_inputs

    fn = tmp_path / "f.py"
    fn.write_text("def r(prompts, responses):\n    return [0.0] * len(prompts)\n")
    cfg = parse_config(
        [
            "--ppo.reward_fn",
            f"{fn}:r",
            "--ppo.reward_model_coef",
            "0",
            "--output_dir",
            str(tmp_path / "run"),
        ]
    )
    stages, not_run = needed_stages(cfg, STAGES)
    assert stages == ("sft", "ppo") and "ppo.reward_fn alone" in not_run["reward"]
    ppo = stage_inputs(cfg, tmp_path / "run", tmp_path / "task")["ppo"]
    assert not any(k.startswith("reward_model") for k in ppo) and ppo["reward_fn"] == str(fn)


def test_an_ensemble_is_one_stage_per_member_and_ppo_reads_them_all(tmp_path):
    from pipeline.fingerprint import identity
    from pipeline.inputs import reward_members, stage_config, stage_inputs

    out = tmp_path / "run"
    cfg = parse_config(
        ["--reward.ensemble_size", "3", "--ppo.ensemble_penalty", "1", "--seed", "5"]
    )
    assert reward_members(cfg) == ("reward", "reward_1", "reward_2")
    assert [stage_config(cfg, m).seed for m in reward_members(cfg)] == [5, 6, 7]
    inputs = stage_inputs(cfg, out, tmp_path / "task")
    assert {k: v for k, v in inputs["ppo"].items() if k.startswith("reward_model")} == {
        "reward_model": str(out / "reward" / "model"),
        "reward_model_1": str(out / "reward_1" / "model"),
        "reward_model_2": str(out / "reward_2" / "model"),
    }
    # Member 0 is the run of one reward model: an ensemble size does not change its identity.
    single = parse_config(["--seed", "5"])
    assert identity("reward", cfg, inputs["reward"], out) == identity(
        "reward", single, inputs["reward"], out
    )
    assert identity("reward_1", stage_config(cfg, "reward_1"), inputs["reward"], out) != identity(
        "reward", cfg, inputs["reward"], out
    )
