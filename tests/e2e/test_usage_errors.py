"""Tier 3: usage errors on two ranks through the `deepspeed` launcher: one `error:` paragraph
(rank 0's; the other rank exits with the same code quietly), exit code 2, nothing written."""

from launch_util import TINY, launch


def _refused_once(proc, out, *needles) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    text = proc.stdout + proc.stderr
    assert "Traceback" not in text
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, text[-3000:]
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    assert not out.exists(), "a refused run wrote something"
    return errors[0]


def test_a_size_that_does_not_divide_is_reported_once_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    proc = launch(
        "ppo.py",
        "--config",
        str(TINY),
        "--output_dir",
        str(out),
        "--ppo.mini_batch_size",
        "6",
        num_gpus=2,
    )
    _refused_once(
        proc, out, "ppo.rollout_batch_size=16 must be a multiple of ppo.mini_batch_size=6"
    )


def test_an_unknown_flag_is_reported_once_with_did_you_mean(tmp_path):
    out = tmp_path / "run"
    proc = launch(
        "ppo.py",
        "--config",
        str(TINY),
        "--output_dir",
        str(out),
        "--model_name_or_path",
        "gpt2",
        num_gpus=2,
    )
    _refused_once(
        proc, out, "unknown option --model_name_or_path (did you mean --model.model_name_or_path?)"
    )
