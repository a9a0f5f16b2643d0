"""torch.export keeps the op as one node per call; ONNX export of the fused op fails clearly."""
import pytest
import torch

import spatialformer
from spatialformer_kernels import available_backends

KERNEL_BACKENDS = [b for b in available_backends() if b != "reference"]


def _small_model(backend, bca_mode="parallel"):
    torch.manual_seed(0)
    return spatialformer.SpatialFormer(
        embed_dims=(32, 32, 64, 64), num_heads=(1, 1, 2, 2), depths=(1, 1, 1, 1), num_classes=5,
        backend=backend, bca_mode=bca_mode,
    ).eval()


def _custom_op_calls(exported) -> list[str]:
    return [str(n.target) for n in exported.graph.nodes if n.op == "call_function" and "spatialformer" in str(n.target)]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("bca_mode", ["parallel", "sequential"])
def test_torch_export_has_the_op_as_one_node_and_reruns_equal(backend, bca_mode):
    model = _small_model(backend, bca_mode)
    images = torch.randn(2, 3, 64, 64)
    exported = torch.export.export(model, (images,))
    calls = _custom_op_calls(exported)
    if bca_mode == "parallel":
        assert calls == ["spatialformer.bilateral_attention.default"] * 2
    else:
        assert calls == ["spatialformer.cross_attention.default"] * 4
    other = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(other), model(other))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS[:1])
def test_onnx_export_of_the_fused_op_names_it(backend, tmp_path):
    model = _small_model(backend)
    with pytest.raises(Exception, match="spatialformer::bilateral_attention"):
        torch.onnx.export(model, (torch.randn(1, 3, 64, 64),), str(tmp_path / "m.onnx"), dynamo=False)
