"""`npu-dit bench ulysses`'s table from results written by hand: the efficiency column, the async verdict
against the spread, and the ceiling row (serial processes side by side)."""

from npu_dit.tools.bench import format_table


def _row(label, devices, median, spread, speedup, efficiency):
    return {"label": label, "devices": devices, "median_s": median, "spread_s": spread, "speedup": speedup,
            "efficiency": efficiency, "max_abs_err_vs_serial": 0.0, "wait_blocked_ms": None,
            "agreement_check_ms": None, "fell_back": False, "streams": []}


def test_ceiling_row_and_verdicts():
    results = {
        "setup": {"runs": 5},
        "order": ["serial", "serial-side-by-side", "ulysses", "ulysses-async"],
        "serial": _row("baseline", 1, 2.0, 0.1, 1.0, 1.0),
        "serial-side-by-side": _row("2 serial processes side by side (ceiling)", 2, 2.5, 0.1, None, 0.8),
        "ulysses": _row("Ulysses-2", 2, 1.25, 0.05, 1.6, 0.8),
        "ulysses-async": _row("Async Ulysses-2", 2, 1.3, 0.05, 2.0 / 1.3, 2.0 / 2.6),
    }
    table = format_table(results)
    assert "| 2 serial processes side by side (ceiling) | 2 CPU processes | 2.500 s | 0.100 s | 70.0 s | - | 0.80 |" in table
    assert "| Ulysses-2 | 2 CPU processes | 1.250 s | 0.050 s | 35.0 s | 1.60x | 0.80 |" in table
    # async is 50 ms slower: not a gain at all, so certainly not one larger than the spread
    assert "Async vs sync: -50 ms per call (-4.0 %)" in table and "not larger than the spread" in table
    assert ("no 2-way split can exceed efficiency 0.80 on this machine; against it Ulysses reaches 1.00 (sync) "
            "and 0.96 (async)") in table
