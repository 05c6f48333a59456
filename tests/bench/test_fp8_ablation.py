"""bench/fp8_ablation.py's floor study rests on `mantissa3` being E4M3's rounding without E4M3's
exponent limits: inside E4M3's normal range it must equal PyTorch's float8_e4m3fn cast (the
cast the exported graph's QuantizeLinear performs), and outside it must keep 4 significant bits
where the cast saturates or goes subnormal."""

import torch

from bench.fp8_ablation import mantissa3


def test_mantissa3_is_the_e4m3_cast_inside_its_normal_range():
    g = torch.Generator().manual_seed(0)
    x = torch.exp(torch.empty(100_000).uniform_(-4.15, 6.0, generator=g))  # 2^-6 .. ~403
    x = x * torch.where(torch.rand(100_000, generator=g) < 0.5, -1.0, 1.0)
    assert torch.equal(mantissa3(x), x.to(torch.float8_e4m3fn).to(torch.float32))


def test_mantissa3_keeps_four_significant_bits_where_e4m3_cannot():
    # 3517 = 0.8586 * 2^12 -> 14/16 * 2^12; 1e-4 = 0.8192 * 2^-13 -> 13/16 * 2^-13; 2365 -> 9/16 * 2^12
    x = torch.tensor([3517.0, 1e-4, -2365.0, 0.0])
    assert mantissa3(x).tolist() == [3584.0, 13 / 16 * 2.0 ** -13, -2304.0, 0.0]
    e4m3 = x.to(torch.float8_e4m3fn).float().tolist()
    assert e4m3[0] == 448.0 and e4m3[1] != 13 / 16 * 2.0 ** -13  # the cast saturates / goes subnormal
