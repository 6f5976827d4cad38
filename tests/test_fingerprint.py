"""`ranks_in_sync`: a hash over each rank's replicated tensors, compared across ranks."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from losia_cli.engine.fingerprint import fingerprint, ranks_in_sync, replicated_tensors


def model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    net.register_buffer("rows", torch.tensor([0, 2]))
    return net


class TwoRanks:
    """An Accelerator stand-in whose gather puts `other`'s fingerprint next to this rank's."""

    num_processes, device = 2, torch.device("cpu")

    def __init__(self, other: nn.Module):
        self.other = other

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return torch.cat([tensor, fingerprint(self.other)])


def test_swapped_elements_change_the_fingerprint_but_not_the_sum():
    a, b = model(), model()
    with torch.no_grad():
        b[0].weight[0, [0, 1]] = b[0].weight[0, [1, 0]]
    assert torch.equal(a[0].weight.sum(), b[0].weight.sum())
    assert not torch.equal(fingerprint(a), fingerprint(b))


def test_ranks_in_sync_compares_parameters_and_buffers():
    a = model()
    assert ranks_in_sync(TwoRanks(model()), a)
    moved = model()
    moved.rows[1] = 3  # one rank re-localized differently
    assert not ranks_in_sync(TwoRanks(moved), a)
    assert ranks_in_sync(SimpleNamespace(num_processes=1), a)


def test_sharded_parameters_are_left_out():
    net = model()
    net[0].weight.ds_id = 0  # how DeepSpeed ZeRO-3 marks a partitioned parameter
    assert set(replicated_tensors(net)) == {"0.bias", "1.weight", "1.bias", "rows"}
