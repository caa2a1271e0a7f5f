"""dsft.quant against bitsandbytes' own (de)quantization, on CPU."""
import pytest
import torch
from torch import nn

from dsft import quant


def _nf4(weight: torch.Tensor, storage=torch.uint8):
    bnb = quant.bitsandbytes_module()

    layer = bnb.nn.Linear4bit(weight.shape[1], weight.shape[0], bias=False,
                              compute_dtype=torch.float32, quant_type="nf4", quant_storage=storage)
    layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4",
                                     quant_storage=storage, module=layer)
    return layer.to("cpu")


def test_a_kept_4bit_weight_still_dequantizes_to_itself_after_the_layer_is_requantized():
    F = quant.bitsandbytes_module().functional

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
    bnb = quant.bitsandbytes_module()

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
    # Bit-identical on every CPU, not only on this one: both paths run the same kernels on the
    # same values, and none of them rounds differently by shape or instruction set (dsft's
    # dequantization and the added delta are elementwise float32, quantize_4bit is a block max,
    # one multiply and a bucketize, the double-quant offset a mean over the same absmax vector).
    # Compare bytes: packed nibbles viewed as bf16 storage can spell NaNs.
    assert torch.equal(packed.view(torch.uint8), whole.weight.data.reshape(-1).view(torch.uint8))
    chunked.weight.data = packed.view(chunked.weight.dtype).reshape(whole.weight.data.shape)
    assert torch.equal(quant.dequantize(chunked), quant.dequantize(whole))
    assert chunked.weight.quant_state.nested == double_quant


# NF4 levels (QLoRA, Dettmers et al. 2023, appendix E), and FP4 (bitsandbytes: sign, 2 exponent
# bits, 1 mantissa bit, scaled to a maximum of 1) by 4-bit code
NF4_LEVELS = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
              -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
              0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
              0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]
FP4_LEVELS = [0.0, 0.005208333333, 0.66666667, 1.0, 0.33333333, 0.5, 0.16666667, 0.25,
              -0.0, -0.005208333333, -0.66666667, -1.0, -0.33333333, -0.5, -0.16666667, -0.25]


def _blockwise_reference(packed: torch.Tensor, absmax: torch.Tensor, levels: list[float],
                         shape, blocksize: int) -> torch.Tensor:
    """Element i of the flattened weight: levels[nibble i] * absmax[i // blocksize], nibble 2k
    being the high half of stored byte k, in float64."""
    count = shape[0] * shape[1]
    index = torch.arange(count)
    stored = packed.reshape(-1).view(torch.uint8).long()[index // 2]
    nibble = torch.where(index % 2 == 0, stored // 16, stored % 16)
    values = torch.tensor(levels, dtype=torch.float64)[nibble]
    return (values * absmax.double()[index // blocksize]).reshape(shape)


@pytest.mark.parametrize("shape", [(75, 96), (8, 32), (7, 224), (64, 128), (10, 40), (3, 1000)])
@pytest.mark.parametrize("quant_type,levels", [("nf4", NF4_LEVELS), ("fp4", FP4_LEVELS)])
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16])
def test_4bit_weights_dequantize_by_flat_blocks_on_every_cpu(shape, quant_type, levels, storage):
    """bitsandbytes blocks a weight over its flattened values. Its AVX-512 CPU kernel indexed
    the scales per row instead whenever the column count is a multiple of 16 but not of the
    block size (96, 32, 224 here), so 4-bit layers computed other weights on AVX-512 CPUs than
    on AVX2 ones; dsft registers its own kernel. Checked through the layer's forward too."""
    torch.manual_seed(0)
    weight = torch.randn(*shape) * 0.02
    layer = _nested_nf4(weight, storage, double_quant=False)
    layer.weight.quant_state.quant_type = quant_type  # re-quantize below with this type
    quant.requantize(layer, weight)
    state = layer.weight.quant_state
    expected = _blockwise_reference(layer.weight.data, state.absmax, levels, shape,
                                    state.blocksize)
    assert torch.allclose(quant.dequantize(layer).double(), expected, rtol=1e-6, atol=0)
    assert ((expected - weight).norm() / weight.norm()) < 0.2  # the 4-bit rounding error, ~9 %
    layer.compute_dtype = torch.float32
    inputs = torch.randn(5, shape[1])
    assert torch.allclose(layer(inputs).double(), inputs.double() @ expected.T, rtol=1e-5,
                          atol=1e-6)


def test_an_evaluation_leaves_a_4bit_layer_as_it_was():
    """bitsandbytes repacks a 4-bit layer into a bf16 layout the first time it runs in eval
    mode without grad on an avx512_bf16 CPU; dsft turns that off, so an eval in the middle of
    training changes nothing (on CPUs without avx512_bf16 this holds either way). 48 rows: the
    repacked kernel would refuse them (not a multiple of 32)."""
    torch.manual_seed(0)
    layer = _nf4(torch.randn(48, 128) * 0.02)
    inputs = torch.randn(6, 128)
    weight_before = quant.dequantize(layer)
    training_output = layer(inputs)
    layer.eval()
    with torch.no_grad():
        eval_output = layer(inputs)
    layer.train()
    assert torch.equal(eval_output, training_output)
    assert torch.equal(quant.dequantize(layer), weight_before)
    assert torch.equal(layer(inputs), training_output)
