"""Packing, group-wise quantization and pruning masks."""

import math

import pytest
import torch

from edge_llm.luc.pack import pack_bits, packed_size, unpack_bits
from edge_llm.luc.prune import prune_mask
from edge_llm.luc.quantize import dequantize, quantize_gptq, quantize_rtn


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [1, 7, 8, 13, 1000])
def test_pack_unpack_is_exact(bits, count):
    values = torch.randint(0, 1 << bits, (count,), generator=torch.Generator().manual_seed(bits * count))
    packed = pack_bits(values, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_size(count, bits) == -(-count * bits // 8)
    assert torch.equal(unpack_bits(packed, bits, count), values.to(torch.uint8))


def test_four_bit_layout_is_low_nibble_first():
    assert pack_bits(torch.tensor([0x3, 0xA]), 4).tolist() == [0xA3]
    assert pack_bits(torch.tensor([1, 2, 3, 0]), 2).tolist() == [0b00111001]


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="1 to 8 bits"):
        pack_bits(torch.tensor([1]), 9)
    with pytest.raises(ValueError, match=r"Values must lie in \[0, 8\)"):
        pack_bits(torch.tensor([8]), 3)
    with pytest.raises(ValueError, match="cannot hold 10 values"):
        unpack_bits(torch.zeros(2, dtype=torch.uint8), 4, 10)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("in_features", [64, 80])  # 80 is not a multiple of the group size
def test_rtn_error_is_at_most_half_a_step(bits, in_features):
    weight = torch.randn(16, in_features, generator=torch.Generator().manual_seed(bits)) * 0.05
    q = quantize_rtn(weight, bits, group_size=32)
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) < 1 << bits
    assert q.scales.dtype == q.zeros.dtype == torch.float16 and q.scales.shape == (16, -(-in_features // 32))
    restored = dequantize(q.codes, q.scales, q.zeros, 32)
    step = q.scales.float().repeat_interleave(32, dim=1)[:, :in_features]
    assert ((restored - weight).abs() <= step / 2 + 1e-7).all()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_the_symmetric_grid_centres_the_codes_on_the_middle_code(bits):
    generator = torch.Generator().manual_seed(bits)
    inputs = torch.randn(256, 64, generator=generator) @ torch.randn(64, 64, generator=generator)
    weight = torch.randn(16, 80, generator=generator) * 0.05 + 0.02  # off-centre: asymmetric would shift
    hessian = torch.nn.functional.pad(inputs, (0, 16)).t() @ torch.nn.functional.pad(inputs, (0, 16))
    middle = 1 << (bits - 1)
    for q in (quantize_rtn(weight, bits, 32, symmetric=True), quantize_gptq(weight, hessian, bits, 32, symmetric=True)):
        assert (q.zeros == middle).all()
        signed = q.codes.int() - middle  # a symmetric kernel's codes, e.g. int4 in [-8, 7]
        assert signed.min() >= -middle and signed.max() <= middle - 1
    q = quantize_rtn(weight, bits, 32, symmetric=True)

    # The smallest scale reaching both ends of the group (torchao's SYMMETRIC_NO_CLIPPING_ERR), to
    # float16's nearest: the larger end is on the grid exactly.
    def grouped(tensor, padding):  # 80 columns: the third group has 16, the padding is not in it
        return torch.nn.functional.pad(tensor, (0, 16), value=padding).view(16, 3, 32)

    low, high = grouped(weight, math.inf).amin(-1), grouped(weight, -math.inf).amax(-1)
    expected = torch.maximum(-low / middle, high / (middle - 1)).half().float()
    torch.testing.assert_close(q.scales.float(), expected, rtol=0, atol=0)
    restored = dequantize(q.codes, q.scales, q.zeros, 32)
    step = q.scales.float().repeat_interleave(32, dim=1)[:, :80]
    assert ((restored - weight).abs() <= step / 2 + 1e-6).all()  # nothing clipped
    binding = torch.where(-low / middle >= high / (middle - 1), low, high)  # the end that sets the scale
    on_grid = (grouped(restored, 0.0) - binding[..., None]).abs().amin(-1)
    assert (on_grid <= binding.abs() * 2**-10).all()


def test_a_merged_update_keeps_a_symmetric_layer_on_its_grid():
    from edge_llm.luc import LUCLinear

    linear = torch.nn.Linear(64, 16, bias=False)
    layer = LUCLinear.from_linear(linear, 4, 0.0, 32, quantize_rtn(linear.weight.detach(), 4, 32, symmetric=True))
    merged = linear.weight.detach() * 1.5
    layer.requantize_(merged)
    assert (layer.weight_zeros == 8).all()
    expected = quantize_rtn(merged, 4, 32, symmetric=True)
    assert torch.equal(
        layer.dequantize_weight(torch.float32), dequantize(expected.codes, expected.scales, expected.zeros, 32)
    )


def test_pruned_weights_dequantize_to_exact_zero():
    weight = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    mask = prune_mask(weight, 0.5, "magnitude")
    q = quantize_rtn(weight, 3, 16, mask)
    restored = dequantize(q.codes, q.scales, q.zeros, 16, mask)
    assert (restored[~mask] == 0).all()
    # Kept weights use ranges computed from kept weights only.
    step = q.scales.float().repeat_interleave(16, dim=1)
    assert ((restored - weight).abs()[mask] <= (step / 2 + 1e-7)[mask]).all()


def test_gptq_beats_round_to_nearest_on_calibration_outputs():
    generator = torch.Generator().manual_seed(0)
    # Correlated inputs, as real activations are: this is where error compensation pays off.
    inputs = torch.randn(512, 64, generator=generator) @ torch.randn(64, 64, generator=generator)
    weight = torch.randn(32, 64, generator=generator) * 0.1
    hessian = inputs.t() @ inputs
    mask = prune_mask(weight, 0.25, "wanda", input_norms=hessian.diag().sqrt())
    errors = {}
    for name in ("rtn", "gptq"):
        q = quantize_rtn(weight, 3, 16, mask) if name == "rtn" else quantize_gptq(weight, hessian, 3, 16, mask)
        restored = dequantize(q.codes, q.scales, q.zeros, 16, mask)
        assert (restored[~mask] == 0).all()
        errors[name] = (inputs @ (restored - weight).t()).pow(2).mean().item()
    assert errors["gptq"] < 0.7 * errors["rtn"], errors


@pytest.mark.parametrize(("sparsity", "kept"), [(0.25, 3), (0.5, 2), (0.75, 1)])
def test_nm_masks_keep_n_of_every_four(sparsity, kept):
    weight = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))
    mask = prune_mask(weight, sparsity, "magnitude", "nm")
    groups = mask.view(8, 8, 4)
    assert (groups.sum(-1) == kept).all()
    # The kept ones are the largest of their group.
    magnitudes = weight.abs().view(8, 8, 4)
    assert (magnitudes.masked_fill(~groups, -1).amax(-1) == magnitudes.amax(-1)).all()


def test_unstructured_masks_keep_the_same_count_per_row_by_wanda_score():
    weight = torch.ones(4, 10)
    norms = torch.arange(10, dtype=torch.float32)  # later input channels matter more
    mask = prune_mask(weight, 0.3, "wanda", input_norms=norms)
    assert (mask.sum(1) == 7).all() and not mask[:, :3].any() and mask[:, 3:].all()


def test_bad_pruning_and_quantization_arguments():
    weight = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        prune_mask(weight, 1.0)
    with pytest.raises(ValueError, match=r"sparsity must be 0, 0\.25, 0\.5 or 0\.75"):
        prune_mask(weight, 0.3, "magnitude", "nm")
    with pytest.raises(ValueError, match="Wanda pruning scores weights by their input activations"):
        prune_mask(weight, 0.5, "wanda")
    with pytest.raises(ValueError, match=r"bits must be one of \(2, 3, 4, 5, 6, 7, 8\)"):
        quantize_rtn(weight, 1, 4)


def _compressed(bits, sparsity, group_size, in_features=256, out_features=48, structure="unstructured", seed=0):
    from edge_llm.luc import LUCLinear

    torch.manual_seed(seed)
    linear = torch.nn.Linear(in_features, out_features)
    weight = linear.weight.detach()
    mask = prune_mask(weight, sparsity, "magnitude", structure) if sparsity else None
    return LUCLinear.from_linear(linear, bits, sparsity, group_size, quantize_rtn(weight, bits, group_size, mask), mask)


def _relative_error(got, reference):
    return ((got - reference).norm() / reference.norm()).item()


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize(("sparsity", "structure"), [(0.0, "unstructured"), (0.5, "unstructured"), (0.5, "nm")])
def test_int4_kernel_matches_the_dequantized_reference(bits, group_size, sparsity, structure):
    layer = _compressed(bits, sparsity, group_size, structure=structure, seed=bits * group_size)
    packed = layer.int4_weight()
    assert packed is not None and packed.group_size == group_size and packed.planes == (1 if bits <= 4 else 2)
    x = torch.randn(3, 5, 256)
    reference = x @ layer.dequantize_weight(torch.float32).t() + layer.bias
    got = layer(x)
    assert got.dtype == torch.float32 and got.shape == (3, 5, 48)
    # The codes enter unchanged (pruned weights as exact zeros); scales, offsets and activations
    # are rounded to bfloat16. Measured: 0.0022-0.0040 relative error.
    assert _relative_error(got, reference) < 6e-3
    transposed = x.transpose(0, 1)  # a non-contiguous view computes as its contiguous copy
    torch.testing.assert_close(layer(transposed), layer(transposed.contiguous()))
    layer.use_kernel = False
    torch.testing.assert_close(layer(x), reference)


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("sparsity", [0.0, 0.25])  # unpacked codes; pruned: the expanded codes
def test_many_rows_compute_within_the_same_tolerance(bits, sparsity):
    from edge_llm.luc.kernels import dense_compute_dtype, kernel_max_rows

    layer = _compressed(bits, sparsity, 64, seed=bits)
    x = torch.randn(kernel_max_rows(x_device := torch.device("cpu")) + 1, 256, device=x_device)
    reference = x @ layer.dequantize_weight(torch.float32).t() + layer.bias
    got = layer(x)
    if dense_compute_dtype(x) == torch.float32 and not sparsity:
        torch.testing.assert_close(got, reference)
    else:
        assert got.dtype == torch.float32 and _relative_error(got, reference) < 6e-3


def test_a_pruned_group_whose_zero_point_leaves_the_code_range_keeps_the_dequantize_path():
    from edge_llm.luc import LUCLinear

    # All kept weights of a group positive: the zero-point lies below code 0 (full resolution for
    # them), so code "z" for a pruned weight does not exist in 8 bits.
    weight = torch.randn(32, 64).abs() + 0.5
    mask = prune_mask(weight, 0.25, "magnitude")
    linear = torch.nn.Linear(64, 32, bias=False)
    linear.weight.data = weight
    layer = LUCLinear.from_linear(linear, 8, 0.25, 32, quantize_rtn(weight, 8, 32, mask), mask)
    assert (layer.weight_zeros < 0).any()
    small_groups = LUCLinear.from_linear(linear, 4, 0.0, 16, quantize_rtn(weight, 4, 16))
    x = torch.randn(4, 64)
    for compressed in (layer, small_groups):
        assert compressed.int4_weight() is None
        assert _relative_error(compressed(x), x @ compressed.dequantize_weight().t()) < 6e-3
    # A schedule that gave this layer the int4_packed kernel still runs: dequantized, with a warning.
    from edge_llm.runtime import Int4Kernel

    module = Int4Kernel(layer)
    assert module.fallback is not None
    torch.testing.assert_close(module(x), x @ layer.dequantize_weight().t())


def test_int4_layout_is_built_once_and_rebuilt_when_the_stored_codes_change():
    from edge_llm.luc import LUCLinear

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 16, bias=False)
    layer = LUCLinear.from_linear(linear, 4, 0.0, 32, quantize_rtn(linear.weight.detach(), 4, 32))
    first = layer.int4_weight()
    assert layer.int4_weight() is first
    other = LUCLinear.from_linear(linear, 4, 0.0, 32, quantize_rtn(2 * linear.weight.detach(), 4, 32))
    layer.load_state_dict(other.state_dict())
    assert layer.int4_weight() is not first
    x = torch.randn(2, 64)
    torch.testing.assert_close(layer(x), other(x))
    rebuilt = layer.int4_weight()
    with torch.no_grad():
        layer.weight_scales.mul_(2)  # in place, through the tensor: its version counter moves
    assert layer.int4_weight() is not rebuilt
    torch.testing.assert_close(layer(x), 2 * other(x))


@pytest.mark.parametrize("rows", [4, 200])  # through the int4 kernel, and dequantized
def test_training_through_a_compressed_layer_gets_the_dequantized_input_gradient(rows):
    layer = _compressed(4, 0.0, 64, 128, 64, seed=1)
    x = torch.randn(rows, 128, requires_grad=True)
    layer(x).sum().backward()
    reference = torch.ones(rows, 64) @ layer.dequantize_weight()
    assert _relative_error(x.grad, reference) < 6e-3
    layer.use_kernel = False
    x.grad = None
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, reference)


@pytest.mark.parametrize(("bits", "sparsity"), [(3, 0.25), (4, 0.5), (8, 0.0), (16, 0.5)])
def test_the_dense_path_dequantizes_row_blocks_that_assemble_the_whole_weight(monkeypatch, bits, sparsity):
    from edge_llm.luc import linear

    layer = _compressed(bits, sparsity, 64, seed=bits) if bits != 16 else None
    if layer is None:
        torch.manual_seed(0)
        dense = torch.nn.Linear(256, 48)
        mask = prune_mask(dense.weight.detach(), sparsity, "magnitude")
        layer = linear.LUCLinear.from_linear(dense, 16, sparsity, 64, None, mask)
    whole = layer.dequantize_weight(torch.float32)
    monkeypatch.setattr(linear, "DEQUANTIZE_BLOCK", 2**10)  # 8 rows a block: 6 blocks
    parts = [layer.dequantize_weight(torch.float32, start, start + 8) for start in range(0, 48, 8)]
    assert torch.equal(torch.cat(parts), whole)
    assert torch.equal(layer.dense_weight(torch.float32), whole)  # assembled from six blocks of 8 rows
    assert torch.equal(layer.dense_weight(torch.bfloat16), whole.bfloat16())
    with pytest.raises(ValueError, match="multiple of 8"):
        layer.dequantize_weight(torch.float32, 4, 12)
    layer.use_kernel = False
    x = torch.randn(100, 256, requires_grad=True)
    out = layer(x)
    out.backward(torch.ones_like(out))
    torch.testing.assert_close(out, x @ whole.t() + layer.bias)
    torch.testing.assert_close(x.grad, torch.ones(100, 48) @ whole)


def test_pruned_layers_keep_mask_free_codes_for_the_dense_path():
    layer = _compressed(3, 0.5, 64, seed=3)
    codes, zeros = layer.expanded_codes()
    assert codes.dtype == torch.uint8 and codes.shape == (48, 256) and layer.expanded_codes()[0] is codes
    mask = layer.mask()
    zero_codes = zeros.repeat_interleave(64, dim=1)
    assert torch.equal(codes[~mask].float(), zero_codes[~mask])  # a pruned weight reads as weight 0
    assert torch.equal(layer.dense_weight(torch.float32), layer.dequantize_weight(torch.float32))
    assert _compressed(3, 0.0, 64).expanded_codes() is None  # unpruned layers unpack their codes instead
    layer.weight_scales.mul_(2)  # the stored tensors changed: rebuilt
    assert layer.expanded_codes()[0] is not codes
