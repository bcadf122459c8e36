"""The model card and the analytic compute count."""
import torch

from helpers import cli, tiny_vim
from visionmamba.models.info import compute


def test_info_reports_exact_parameters_and_checked_compute():
    out = cli("info", "vim_small_patch16_stride8_224").stdout
    assert "26,001,256" in out and "vim_s_midclstok_ft_81p6acc.pth" in out and "730 tokens" in out


def test_compute_count_matches_spec_formulas_and_a_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny_vim(depth=2, scan_backend="reference").eval()
    cost = compute(model, (32, 48))
    L, E, N, depth = 4 * 6 + 1, 64, 16, 2
    assert cost.scan == depth * 2 * (3 * L * E * N + L * E * N)  # Eq. 8 per direction
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, 32, 48))
    # The counter sees every product twice (multiply + add); the reference scan's read-out h @ C is a bmm
    # (2 L E N per direction); F.conv1d computes K - 1 padded outputs more than it keeps.
    readout = depth * 2 * 2 * L * E * N
    padding = depth * 2 * 2 * E * 3 * 4
    assert counter.get_total_flops() == 2 * cost.macs + readout + padding
