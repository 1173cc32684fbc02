"""Real-size dry runs (issue 15, item 5): each architecture of `distill_nb.plan.DRY_RUNS` built at its real size with random weights,
2 optimisation steps at the smallest batch, a checkpoint, a third step, a resume from the checkpoint (its third step bit-identical to the
uninterrupted one), and the planner's per-device peak for the same phase, batch and dtype within 30 % of the measured peak RSS above the
warmed-up interpreter's baseline. Slow (seconds to minutes each on 2 cores): run by `make slow` (DISTILL_NB_SLOW=1). Each record is kept
in $DISTILL_NB_HOME/cache/dryrun/<case>.json, where the notebook's table reads it."""
import pytest
from distill_nb.plan import GiB, DRY_RUNS, dry_run_case, dry_run_table

@pytest.mark.slow
@pytest.mark.parametrize("name", list(DRY_RUNS))
def test_dry_run(name):
    r = dry_run_case(name, rerun=True, timeout=1500)
    print("\n" + dry_run_table([r]))
    assert r["reload_equal"], "the reloaded checkpoint differs from the saved state"
    assert r["bit_identical"], "the resumed third step differs from the uninterrupted one"
    assert 0.7 <= r["ratio"] <= 1.3, f"planned {r['planned'] / GiB:.2f} GiB vs measured {r['measured'] / GiB:.2f} GiB (ratio {r['ratio']:.2f})"
