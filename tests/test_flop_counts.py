"""FLOP formulas of the custom ops agree with what FlopCounterMode counts for the reference."""
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from spatialformer.complexity import markdown_table, measure
from spatialformer_kernels.ops.bilateral_attention import _bilateral_attention_op
from spatialformer_kernels.ops.cross_attention import _cross_attention_op
from spatialformer_kernels.reference import bilateral_attention_reference, cross_attention_reference
from spatialformer_kernels.testing import make_bilateral_inputs


def _flops(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def test_bilateral_forward_flops_equal_reference_matmuls():
    inputs = make_bilateral_inputs(2, 3, 5, 7, 16)
    reference = _flops(lambda: bilateral_attention_reference(*inputs, 0.25))
    with FakeTensorMode() as mode:  # fake tensors: the formula is counted without running a kernel
        fake = [mode.from_tensor(t) for t in inputs]
        ours = _flops(lambda: _bilateral_attention_op(*fake, 0.25, None, "triton"))
    assert ours == reference == 8 * 2 * 3 * 5 * 7 * 16


def test_cross_forward_flops_equal_reference_matmuls():
    q, k, v = make_bilateral_inputs(2, 3, 5, 7, 16)[3:]
    q = q[:, :, :4]
    reference = _flops(lambda: cross_attention_reference(q, k, v, 0.25))
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in (q, k, v)]
        ours = _flops(lambda: _cross_attention_op(*fake, 0.25, None, "triton"))
    assert ours == reference


def test_complexity_table_counts_a_small_model():
    row = measure("spatialformer_tiny", img_size=64)
    assert row["params"] > 9e6 and row["flops"] > 0
    assert "| spatialformer_tiny | " in markdown_table([row], 64)
