"""The decision between DeepSpeed's own hybrid engine (GPU only) and ours, and why."""
import pytest

from pipeline.generation import DS_HYBRID_MODEL_TYPES, choose_backend

ON = {"hybrid_engine": {"enabled": True}}


def test_deepspeed_hybrid_engine_only_on_gpu_with_a_supported_architecture():
    assert choose_backend(ON, "llama", "cuda")[0] == "deepspeed"
    assert choose_backend(ON, "opt", "cuda")[0] == "deepspeed"


@pytest.mark.parametrize("ds,model_type,device,reason", [
    ({}, "llama", "cuda", "hybrid_engine.enabled is off"),
    ({"hybrid_engine": {"enabled": False}}, "llama", "cuda", "hybrid_engine.enabled is off"),
    (ON, "llama", "cpu", "no CPU kernels"),
    (ON, "qwen2", "cuda", "does not support model_type 'qwen2'"),
    (ON, "mistral", "cuda", "does not support"),
])
def test_fallback_says_why(ds, model_type, device, reason):
    backend, why = choose_backend(ds, model_type, device)
    assert backend == "materialise"
    assert reason in why


def test_supported_list_is_what_deepspeed_documents():
    assert set(DS_HYBRID_MODEL_TYPES) == {"opt", "llama", "bloom", "gptj", "gpt_neox"}
