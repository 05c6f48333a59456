"""The static cache's write-slot rule (contract: row b writes at max(0, last_b + 1 - seq)) and the
decode width choices, on small hand-made masks."""

from __future__ import annotations

import pytest
import torch

from export.errors import ConfigError, InputError
from export.kv_cache import KV_CACHE_LAYOUTS, decode_width

STATIC, CONCAT = KV_CACHE_LAYOUTS["static"], KV_CACHE_LAYOUTS["concat"]


def mask(*rows: str) -> torch.Tensor:
    return torch.tensor([[int(c) for c in row] for row in rows])  # [batch, W]


@pytest.mark.parametrize("rows,seq,slots", [
    (("1111100", "1110000"), 1, [4, 2]),  # decode, rows at their own lengths, W = the longest + padding
    (("1111111", "1110000"), 7, [0, 0]),  # a right-padded prefill: every row from slot 0
    (("0011111", "1111111"), 2, [5, 5]),  # onnxruntime-genai: left-padded, lockstep
    (("1111100", "0000000"), 1, [4, 0]),  # an idle row (all zeros) writes at 0
    (("1111111", "1100000"), 3, [4, 0]),  # a 3-token step beside a 2-token prompt from slot 0
    (("1011100",), 1, [4]),  # the last nonzero slot counts, not the number of ones
])
def test_each_row_writes_after_its_last_real_slot(rows, seq, slots):
    assert STATIC.write_slots(mask(*rows), seq).tolist() == slots
    width = len(rows[0])
    assert CONCAT.write_slots(mask(*rows), seq).tolist() == [width - seq] * len(rows)  # appends: lockstep


def test_the_update_writes_each_row_at_its_own_slots():
    past = torch.zeros(2, 1, 8, 1)
    new = torch.tensor([[[[1.0], [2.0]]], [[[3.0], [4.0]]]])  # [batch 2, kv 1, seq 2, dim 1]
    present, seen = STATIC.update(past, new, torch.tensor([3, 0]), 6)
    assert present[0, 0, :, 0].tolist() == [0, 0, 0, 1, 2, 0, 0, 0]
    assert present[1, 0, :, 0].tolist() == [3, 4, 0, 0, 0, 0, 0, 0]
    assert seen.shape == (2, 1, 6, 1)  # attention reads W slots


def test_decode_width_choices():
    assert decode_width("live", 300, 4096) == 300
    assert decode_width("max", 300, 4096) == 4096
    assert [decode_width("buckets", n, 4096) for n in (1, 128, 129, 300, 4000, 4096)] == [128, 128, 256, 512, 4096, 4096]
    assert decode_width("buckets", 150, 160) == 160  # never past the buffer
    with pytest.raises(InputError, match="max_seq_len=4096"):
        decode_width("live", 4097, 4096)
    with pytest.raises(ConfigError, match="choose one of live, buckets, max"):
        decode_width("fixed", 1, 4096)
