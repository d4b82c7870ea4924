"""The sampling rows' compile column (benchmarks/generators.py): a compile that falls back to eager in a row's own
warm-up, or a function past dynamo's recompile limit (it then runs eagerly), says so in that row."""
import logging
from types import SimpleNamespace

import torch

from benchmarks.common import RowSink
from benchmarks.generators import Bench, _Warnings


def test_a_recompile_limit_hit_is_reported():
    torch._dynamo.reset()
    try:
        with _Warnings("torch._dynamo") as warn, torch._dynamo.config.patch(recompile_limit=1,
                                                                             automatic_dynamic_shapes=False):
            assert warn.status("compiled") == "compiled"
            double = torch.compile(lambda x: x * 2, backend="eager")
            for n in (2, 3):
                assert torch.equal(double(torch.ones(n)), torch.full((n,), 2.0))
    finally:
        torch._dynamo.reset()
    assert warn.status("compiled").startswith("failed -> eager (torch._dynamo hit config.recompile_limit (1)")
    assert "\n" not in warn.status("compiled")


def test_the_column_is_read_after_the_rows_warm_up():
    """``Bench.row`` takes the column as a function and reads it after timing: a fallback in the row's own warm-up
    (here: its first call) is in that row, not only in the next."""
    bench = Bench(SimpleNamespace(smoke=True, batch=2), RowSink(None, "test", smoke=True), "masked-B")
    log = logging.getLogger("generator.masked")
    calls = []

    def sample():
        if not calls:
            log.warning("torch.compile of the masked sampler's confidence update failed (X); running it eagerly")
        calls.append(1)
    with _Warnings("generator.masked") as warn:
        row = bench.row("b1", sample, batch=1, compile=lambda: warn.status("compiled"), decode=False)
    assert len(calls) >= 2 and row["compile"].startswith("failed -> eager (torch.compile of the masked sampler")
