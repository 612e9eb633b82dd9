"""The extension: a clear error when it is missing, the op registered with its schema, opcheck."""
from __future__ import annotations

import sys

import pytest
import torch

from onp_fast import _ext
from onp_fast.errors import UserError
from onp_fast.ops.neuron_graphs import load_op


def test_missing_extension_says_how_to_build(monkeypatch):
    import onp_fast

    monkeypatch.setitem(sys.modules, "onp_fast._C", None)  # makes `from . import _C` raise ImportError
    monkeypatch.delattr(onp_fast, "_C", raising=False)
    with pytest.raises(UserError, match=r"not built .*make build.*pip install --no-build-isolation -e \."):
        _ext.load.__wrapped__()


def test_op_registered_with_schema():
    op = load_op()
    schema = str(op.default._schema)
    assert schema.startswith("onp_fast::neuron_graphs(Tensor[] weights, float eps, float dormant_quantile, "
                             "int cross_layer_topk)")
    assert "Tensor edge_index" in schema and "Tensor node_features" in schema
    assert torch._C._dispatch_has_kernel_for_dispatch_key("onp_fast::neuron_graphs", "CPU")
    assert isinstance(_ext.built_with_cuda(), bool)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cross", [0, 2])
def test_opcheck(dtype, cross):
    g = torch.Generator().manual_seed(0)
    w = [torch.randn(6, 3, 3, 3, generator=g), torch.randn(8, 6, 3, 3, generator=g), torch.randn(4, 8, generator=g)]
    w = [x.to(dtype) for x in w]
    torch.library.opcheck(load_op(), (w, 0.5, 0.1, cross))
    torch.library.opcheck(load_op(), ([w[1].transpose(2, 3)], -1.0, 0.0, 0))
