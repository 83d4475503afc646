"""Shared fixtures: the default task's word-level tokenizer, built once per test session."""

import pytest


@pytest.fixture(scope="session")
def task_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from pipeline.default_task import build_tokenizer

    folder = tmp_path_factory.mktemp("task") / "tok"
    build_tokenizer(folder)
    return AutoTokenizer.from_pretrained(str(folder))
