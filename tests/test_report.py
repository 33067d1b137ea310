"""Comparison tables: bootstrap intervals behave, and the table shows each arm's means."""

import numpy as np
import pytest

from moalign.playground.report import arm_table, bootstrap_ci


def test_bootstrap_ci_contains_the_mean_and_shrinks_with_more_prompts():
    rng = np.random.default_rng(0)
    small = rng.random(10)
    big = rng.random(1000)
    m, lo, hi = bootstrap_ci(small)
    assert lo <= m <= hi and m == pytest.approx(small.mean())
    _, lo2, hi2 = bootstrap_ci(big)
    assert hi2 - lo2 < hi - lo
    assert bootstrap_ci([0.5] * 7) == (0.5, 0.5, 0.5)  # no spread, no interval
    assert bootstrap_ci(small, seed=3) == bootstrap_ci(small, seed=3)
    with pytest.raises(ValueError):
        bootstrap_ci([])


def test_arm_table_rows_and_values():
    def result(sa, pc):
        return {"videos": [{"video": f"v{i}", "sa": sa, "pc": pc, "joint": float(sa >= 0.5 and pc >= 0.5),
                            "motion": 2.0} for i in range(4)]}  # fmt: skip

    table = arm_table({"none": result(0.25, 1.0), "moalign": result(0.75, 1.0)})
    rows = table.splitlines()
    assert (
        rows[0].startswith("| arm | SA (%)") and len([r for r in rows if r.startswith("| ")]) == 3
    )  # header + 2 arms
    assert "| none | 25.0 [25.0, 25.0] | 100.0 [100.0, 100.0] | 0.0 [0.0, 0.0] | 2.0 [2.0, 2.0] | 4 |" in rows
    assert "| moalign | 75.0 [75.0, 75.0]" in table
