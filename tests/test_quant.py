"""dsft.quant against bitsandbytes' own (de)quantization, on CPU."""
import pytest
import torch
from torch import nn

from dsft import quant


def _nf4(weight: torch.Tensor, storage=torch.uint8):
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(weight.shape[1], weight.shape[0], bias=False,
                              compute_dtype=torch.float32, quant_type="nf4", quant_storage=storage)
    layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4",
                                     quant_storage=storage, module=layer)
    return layer.to("cpu")


def test_a_kept_4bit_weight_still_dequantizes_to_itself_after_the_layer_is_requantized():
    import bitsandbytes.functional as F

    torch.manual_seed(0)
    for storage in (torch.uint8, torch.bfloat16):
        layer = _nf4(torch.randn(32, 128) * 0.02, storage)
        kept = (layer.weight.data.detach().reshape(-1).clone(), quant.quant_state(layer))
        original = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        quant.requantize(layer, quant.dequantize(layer) + 0.01)
        assert not torch.equal(quant.dequantize(layer), original)
        restored = quant.dequantize_stored(*kept)
        assert restored.dtype == torch.float32 and torch.equal(restored, original.float())


def test_a_float_layer_has_no_quant_state():
    assert quant.quant_state(nn.Linear(4, 4)) is None


def _nested_nf4(weight: torch.Tensor, storage=torch.uint8, double_quant=True):
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(weight.shape[1], weight.shape[0], bias=False,
                              compute_dtype=torch.bfloat16, quant_type="nf4",
                              compress_statistics=double_quant, quant_storage=storage)
    layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=double_quant, quant_storage=storage,
                                     module=layer)
    return layer.to("cpu")


@pytest.mark.parametrize("storage,double_quant,cols", [(torch.uint8, True, 128),
                                                       (torch.bfloat16, True, 96),
                                                       (torch.uint8, False, 40)])
def test_requantizing_by_rows_is_bit_identical_to_requantizing_the_whole_sum(storage, double_quant,
                                                                             cols):
    torch.manual_seed(1)
    rows = 75  # 40 columns: a 4-bit block straddles rows, and 75 x 40 is not a block multiple
    delta = torch.randn(rows, cols) * 0.01
    whole, chunked = (_nested_nf4(torch.randn(rows, cols) * 0.02, storage, double_quant)
                      for _ in range(2))
    chunked.weight.data = whole.weight.data.clone()
    chunked.weight.quant_state = whole.weight.quant_state
    kept = (whole.weight.data.reshape(-1).clone(), quant.quant_state(whole))
    quant.requantize(whole, quant.dequantize(whole) + delta)
    calls = []

    def add_rows(rows_slice, values):
        calls.append(rows_slice)
        values += delta[rows_slice]

    packed = quant.requantize_by_rows(chunked, *kept, add_rows, chunk_elements=1000)
    assert len(calls) > 2 and calls[-1].stop == rows
    # compare bytes: packed nibbles viewed as bf16 storage can spell NaNs
    assert torch.equal(packed.view(torch.uint8), whole.weight.data.reshape(-1).view(torch.uint8))
    chunked.weight.data = packed.view(chunked.weight.dtype).reshape(whole.weight.data.shape)
    assert torch.equal(quant.dequantize(chunked), quant.dequantize(whole))
    assert chunked.weight.quant_state.nested == double_quant
