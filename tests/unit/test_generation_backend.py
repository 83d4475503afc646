"""The generation backend: one documented interface, and DeepSpeed's hybrid engine refused."""

import inspect
import json

import pytest

from pipeline.distributed.ds_config import load_ds_config
from pipeline.errors import UserError
from pipeline.generation import BACKENDS, GenerationBackend, HybridEngine, make_backend

ZERO3 = {"zero_optimization": {"stage": 3}}


@pytest.mark.parametrize(
    "section", [{"enabled": True}, {"enabled": True, "inference_tp_size": 2}, True]
)
def test_deepspeed_hybrid_engine_is_refused_naming_the_file_and_the_way_out(tmp_path, section):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({**ZERO3, "hybrid_engine": section}))
    with pytest.raises(UserError) as e:
        load_ds_config(path)
    message = str(e.value)
    assert f"DeepSpeed config {path} enables hybrid_engine" in message
    assert "remove the hybrid_engine section" in message and '"enabled": false' in message
    assert "\n" not in message  # one paragraph


def test_a_disabled_hybrid_engine_section_is_accepted(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({**ZERO3, "hybrid_engine": {"enabled": False}}))
    assert load_ds_config(path)["hybrid_engine"] == {"enabled": False}


def test_every_backend_has_the_interface_the_stage_uses():
    assert BACKENDS == {"materialise": HybridEngine}
    for cls in BACKENDS.values():
        for name in ("generation_mode", "generate"):
            assert callable(getattr(cls, name)), (cls, name)
        assert list(inspect.signature(cls).parameters)[:3] == [
            "actor_engine",
            "tokenizer",
            "gather_modules",
        ]
        got = list(inspect.signature(cls.generate).parameters)
        assert got == list(inspect.signature(GenerationBackend.generate).parameters), got
    assert make_backend.__annotations__["return"] in ("GenerationBackend", GenerationBackend)
