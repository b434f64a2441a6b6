"""The server's log: known noise left out, nothing else."""

from __future__ import annotations

import logging


def test_the_hub_kernel_warning_is_left_out_and_other_warnings_are_not(caplog):
    from mygpt.cli import _quiet_known_noise

    _quiet_known_noise()
    ops = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        ops.warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'. "
            "Please make sure you already `pip install kernels` and the kernels >= 0.11.1"
        )
        ops.warning("some other bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["some other bitsandbytes warning"]
