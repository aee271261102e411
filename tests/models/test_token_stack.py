import pytest
import torch

from layerwise.compression.importance import compute_importance
from layerwise.models import build_backbone, preset_config
from layerwise.models.token_stack import TEXT_METHODS, TokenStack, text_batches

VOCAB = 40


def tiny_stack(n_layers: int = 3) -> TokenStack:
    torch.manual_seed(0)
    # No padding row: token 0 is a real token here, as in a real vocabulary.
    config = preset_config("qwen2", "tiny", n_layers=n_layers, dropout=0.0, vocab_size=VOCAB, pad_token_id=None)
    return TokenStack(build_backbone(config).eval())


class FakeTokenizer:
    """Each character is a token: id = its position in the alphabet (so 'a' is the real token 0)."""

    def __call__(self, text, truncation=True, max_length=None):
        ids = [ord(c) - ord("a") for c in text][:max_length]
        return {"input_ids": ids}


def test_text_batches_shift_ids_and_pad_right():
    batches = text_batches(FakeTokenizer(), ["abc", "", "d", "bbbbbb"], batch_size=2, max_tokens=4)
    assert len(batches) == 2  # the empty text is skipped
    inputs, targets = batches[0]
    assert inputs.tolist() == [[1, 2, 3], [4, 0, 0]]  # token 0 ('a') becomes 1; 0 is padding
    assert torch.equal(inputs, targets)
    assert batches[1][0].tolist() == [[2, 2, 2, 2]]  # truncated at max_tokens


def test_encode_ignores_right_padding():
    stack = tiny_stack()
    short = torch.tensor([[5, 6, 7]])
    padded = torch.tensor([[5, 6, 7, 0, 0], [1, 2, 3, 4, 5]])
    with torch.no_grad():
        alone, batched = stack.encode(short), stack.encode(padded)
    assert batched.shape == (2, 5, stack.backbone.config.hidden_size)
    torch.testing.assert_close(batched[0, :3], alone[0], atol=1e-5, rtol=1e-5)


def test_block_influence_is_one_minus_cosine_of_each_layer_over_real_tokens():
    stack = tiny_stack()
    batches = text_batches(FakeTokenizer(), ["abcde", "fg", "hij"], batch_size=3, max_tokens=8)
    scores = compute_importance(stack, batches, TEXT_METHODS)
    assert sorted(scores) == sorted(TEXT_METHODS) and scores["block_influence"].shape == (3,)
    inputs = batches[0][0]
    with torch.no_grad():
        out = stack.backbone(input_ids=(inputs - 1).clamp(min=0), attention_mask=(inputs != 0).long(),
                             output_hidden_states=True)
    real = inputs != 0
    for layer in range(2):  # the last entry of hidden_states is after the final norm
        h_in, h_out = out.hidden_states[layer][real].double(), out.hidden_states[layer + 1][real].double()
        expected = (1 - torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1)).mean()
        assert scores["block_influence"][layer].item() == pytest.approx(expected.item(), rel=1e-4)


def test_bidirectional_backbone_is_refused():
    with pytest.raises(ValueError, match="decoder"):
        TokenStack(build_backbone(preset_config("bert", "tiny")))
