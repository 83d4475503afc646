"""The orchestrator's checks before the first stage: every given path, sizes and data, all before
anything is written, and the default task generated only when a stage that runs reads it."""

import json

import pytest

from pipeline import inputs, orchestrator
from pipeline.cli import parse_config
from pipeline.distributed import collectives
from pipeline.errors import SharedUserError, UserError

ONE_RANK = collectives.Dist(0, 1, 0, 1)


@pytest.fixture
def models(tmp_path):
    """Folders standing in for a finished policy and reward model (only their existence is read)."""
    actor, reward = tmp_path / "actor", tmp_path / "reward"
    actor.mkdir()
    reward.mkdir()
    return ["--ppo.actor_model_path", str(actor), "--ppo.reward_model_path", str(reward)]


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(40)))
    return str(path)


def _refused(tmp_path, argv, stages=inputs.STAGES) -> str:
    cfg = parse_config(["--output_dir", str(tmp_path / "run"), *argv])
    with pytest.raises(UserError) as e:
        orchestrator.run(cfg, ONE_RANK, stages)
    assert not (tmp_path / "run").exists(), "a refused run wrote something"
    return str(e.value)


def test_a_missing_tokenizer_is_refused_even_when_both_model_paths_make_it_unused(tmp_path, models):
    message = _refused(tmp_path, [*models, "--data.tokenizer_path", "/nonexistent"])
    assert message == (
        "option data.tokenizer_path: /nonexistent does not exist (expected a local tokenizer "
        "folder or a hub name)."
    )


@pytest.mark.parametrize(
    "option",
    [
        "model.model_name_or_path",
        "model.reward_model_name_or_path",
        "data.sft_data_path",
        "data.reward_eval_data_path",
        "data.prompt_data_path",
        "data.eval_prompt_data_path",
        "ppo.ptx_data_path",
        "ppo.actor_model_path",
    ],
)
def test_every_given_path_is_checked_whichever_stages_run(tmp_path, option):
    message = _refused(tmp_path, [f"--{option}", str(tmp_path / "missing")], stages=("sft",))
    assert message.startswith(f"option {option}: {tmp_path / 'missing'} does not exist (expected ")


def test_one_missing_dataset_of_several_is_named(tmp_path, prompts):
    message = _refused(tmp_path, ["--data.data_path", prompts, "./gone.jsonl"])
    assert message.startswith("option data.data_path: ./gone.jsonl does not exist")


def test_reward_functions_and_deepspeed_files_are_checked_by_every_launcher(tmp_path):
    assert "the file /x/gold.py does not exist" in _refused(
        tmp_path, ["--ppo.eval_reward_fn", "/x/gold.py:gold"], stages=("sft",)
    )
    assert _refused(tmp_path, ["--ds_inference_config", "/x/ds.json"], stages=("sft",)) == (
        "option ds_inference_config: /x/ds.json does not exist "
        "(expected a DeepSpeed JSON file, or auto)."
    )


def test_sizes_that_do_not_divide_are_refused_before_the_default_task_is_written(tmp_path):
    message = _refused(tmp_path, ["--ppo.mini_batch_size", "6"])
    assert "ppo.rollout_batch_size=32 must be a multiple of ppo.mini_batch_size=6" in message


def test_bad_rows_of_a_users_prompt_file_are_refused_before_the_default_task_is_written(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p"}) + "\n" + json.dumps({"prompt": ""}) + "\n")
    assert "bad.jsonl, row 1" in _refused(tmp_path, ["--data.prompt_data_path", str(bad)])


def test_chat_rows_for_the_default_tokenizer_are_checked_before_it_is_written(tmp_path):
    chat = tmp_path / "chat.jsonl"
    row = {"messages": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "r"}]}
    chat.write_text((json.dumps(row) + "\n") * 4)
    message = _refused(tmp_path, ["--data.sft_data_path", str(chat)], stages=("sft",))
    assert "chat template" in message and str(tmp_path / "run" / "task" / "tokenizer") in message


def test_the_default_task_is_generated_only_when_a_stage_that_runs_reads_it(
    tmp_path, models, prompts
):
    out = ["--output_dir", str(tmp_path / "run")]
    assert inputs.needs_task(parse_config(out))  # the default run
    assert inputs.needs_task(parse_config([*out, *models]), ("ppo",))  # the task's prompts
    own = parse_config([*out, *models, "--data.prompt_data_path", prompts])
    stages, _ = inputs.needed_stages(own, inputs.STAGES)
    assert stages == ("ppo",) and not inputs.needs_task(own, stages)
    assert inputs.needs_task(own)  # SFT would read the task's model, were it run


def test_ppo_from_two_given_models_on_own_prompts_writes_no_default_task(
    tmp_path, models, prompts, monkeypatch
):
    ran = []
    monkeypatch.setattr(
        orchestrator, "_stage_fn", lambda name: lambda ctx: ran.append(name) or {"done": 1}
    )
    monkeypatch.setattr(collectives, "barrier", lambda: None)  # one rank, no process group
    cfg = parse_config(
        [
            "--output_dir",
            str(tmp_path / "run"),
            *models,
            "--data.prompt_data_path",
            prompts,
            "--resume",
            "false",
        ]
    )
    summary = orchestrator.run(cfg, ONE_RANK)
    assert ran == ["ppo"] and summary["ppo"]["done"] == 1
    assert not (tmp_path / "run" / "task").exists()


def test_a_check_that_fails_on_another_rank_only_is_raised_on_every_rank(monkeypatch):
    monkeypatch.setattr(
        collectives, "all_gather_object", lambda obj: [None, "option x: /p does not exist."]
    )
    monkeypatch.setattr(orchestrator, "node_name", lambda: "node2")
    with pytest.raises(UserError, match=r"^on rank 1 \(node2\): option x: /p does not exist\.$"):
        orchestrator._agreed(collectives.Dist(0, 2, 0, 2), lambda: None)
    monkeypatch.setattr(collectives, "all_gather_object", lambda obj: [obj, obj])
    with pytest.raises(UserError, match=r"^boom$"):
        orchestrator._agreed(
            collectives.Dist(0, 2, 0, 2), lambda: (_ for _ in ()).throw(UserError("boom"))
        )


@pytest.mark.parametrize(
    "error, printed",
    [
        (SharedUserError("agreed: every rank has it"), False),
        (UserError("only rank 1 saw this row"), True),
    ],
)
def test_rank_1_prints_a_mistake_only_it_met_and_leaves_an_agreed_one_to_rank_0(
    monkeypatch, capsys, error, printed
):
    monkeypatch.setattr(
        collectives, "init_distributed", lambda timeout: collectives.Dist(1, 2, 1, 2)
    )
    monkeypatch.setattr(orchestrator, "setup_logging", lambda main: None)
    monkeypatch.setattr(orchestrator, "placement", lambda names: "")
    monkeypatch.setattr(collectives, "all_gather_object", lambda obj: [obj, obj])
    monkeypatch.setattr(orchestrator, "run", lambda *a: (_ for _ in ()).throw(error))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(SystemExit) as e:
        orchestrator.main(inputs.STAGES, "test", [])
    assert e.value.code == 2
    assert (str(error) in capsys.readouterr().err) is printed
