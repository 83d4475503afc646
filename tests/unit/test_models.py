"""Model-folder and vocabulary checks; scores read at the last real token."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from pipeline.errors import UserError
from pipeline.models import check_vocab, load_causal_lm, sequence_scores


def _tiny(vocab: int, **kw):
    torch.manual_seed(0)
    return LlamaForSequenceClassification(LlamaConfig(
        vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, num_labels=1, **kw))


def test_vocab_mismatch_is_refused(task_tokenizer):
    check_vocab(_tiny(len(task_tokenizer)), task_tokenizer, "model m")  # fits
    with pytest.raises(UserError, match=r"model m: the tokenizer has \d+ tokens but the model's vocabulary has 10"):
        check_vocab(_tiny(10), task_tokenizer, "model m")


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(UserError, match="not a Hugging Face model folder"):
        load_causal_lm(str(tmp_path))


def test_score_is_read_at_the_last_real_token_for_left_and_right_padding():
    model = _tiny(50).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    alone = sequence_scores(model, ids, torch.ones_like(ids))
    right = sequence_scores(model, torch.tensor([[5, 6, 7, 8, 0, 0]]), torch.tensor([[1, 1, 1, 1, 0, 0]]))
    assert torch.allclose(alone, right, atol=1e-5)
    left_mask = torch.tensor([[0, 0, 1, 1, 1, 1]])
    positions = (left_mask.cumsum(1) - 1).clamp(min=0)
    hidden = model.base_model(input_ids=torch.tensor([[0, 0, 5, 6, 7, 8]]), attention_mask=left_mask,
                              position_ids=positions).last_hidden_state
    assert torch.allclose(model.score(hidden)[:, -1, 0], alone, atol=1e-5)
