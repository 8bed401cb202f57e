"""The one verdict rule (sepconv.evidence), driven with synthetic numbers on every branch."""

import math

import pytest
from scipy import stats

from sepconv.errors import ConfigError
from sepconv.evidence import combine, combine_some, compare, mean_interval, pooled_accuracy


def test_the_interval_is_students_t_on_the_mean():
    mean, lo, hi = mean_interval([1.0, 2.0, 4.0])
    half = stats.t.ppf(0.975, 2) * stats.tstd([1.0, 2.0, 4.0]) / math.sqrt(3)
    assert mean == pytest.approx(7 / 3) and lo == pytest.approx(7 / 3 - half) and hi == pytest.approx(7 / 3 + half)
    assert mean_interval([5.0]) == (5.0, -math.inf, math.inf)


@pytest.mark.parametrize("diffs,claim,delta,held", [
    ([1.0, 1.2, 0.9], "greater", 0, True),            # clearly above 0
    ([-1.0, -1.2, -0.9], "greater", 0, False),        # clearly below 0
    ([1.0, -1.0, 0.5], "greater", 0, None),           # straddles 0
    ([-1.0, -1.2, -0.9], "less", 0, True),
    ([1.0, 1.2, 0.9], "less", 0, False),
    ([0.3, -0.3, 0.1], "less", 0, None),
    ([-0.2, -0.1, -0.15], "no_worse", 0.5, True),     # worse, but by less than the margin
    ([-2.0, -2.2, -1.9], "no_worse", 0.5, False),     # worse by more than the margin
    ([-0.5, -0.1, -0.9], "no_worse", 0.5, None),      # the interval reaches past the margin
    ([0.2, 0.1, 0.15], "no_greater", 0.5, True),
    ([2.0, 2.2, 1.9], "no_greater", 0.5, False),
    ([0.5, 0.1, 0.9], "no_greater", 0.5, None),
    ([3.0], "greater", 0, None),                      # one draw decides nothing
])
def test_every_branch_of_the_rule(diffs, claim, delta, held):
    control = [10.0] * len(diffs)
    c = compare([10.0 + d for d in diffs], control, claim, delta, what="x")
    assert c.held is held and c.n == len(diffs)
    assert c.mean == pytest.approx(sum(diffs) / len(diffs))
    assert c.lo <= c.mean <= c.hi


def test_combined_claims_need_every_part():
    assert combine([True, True]) is True
    assert combine([True, None]) is None
    assert combine([True, None, False]) is False
    assert combine([]) is None


def test_bad_input_is_refused():
    with pytest.raises(ConfigError, match="claim"):
        compare([1.0], [1.0], "bigger")
    with pytest.raises(ConfigError, match="paired"):
        compare([1.0, 2.0], [1.0])
    with pytest.raises(ConfigError, match="delta"):
        compare([1.0], [1.0], "no_worse", delta=-1)
    with pytest.raises(ConfigError, match="finite"):
        mean_interval([1.0, math.nan])


def test_the_description_states_interval_draws_and_margin():
    c = compare([0.95, 0.96, 0.97], [0.94, 0.95, 0.97], "no_worse", 0.01)
    text = c.describe(scale=100, unit=" pp")
    assert "over 3 paired draws" in text and "95 % t-interval" in text and "margin 1.00 pp" in text


@pytest.mark.parametrize("parts,held", [
    ([True, None, None], True),      # rose at one radius, undecided at the others
    ([True, False, None], False),    # fell somewhere: not an improvement
    ([None, None, None], None),      # nothing decided
    ([True, True, True], True),
    ([False, None], False),
    ([], None),
])
def test_a_claim_that_holds_somewhere_on_a_grid(parts, held):
    assert combine_some(parts) is held


def test_pooled_accuracy_counts_every_image_once_with_its_binomial_standard_error():
    acc, se = pooled_accuracy([0.9, 0.8], [100, 300])
    assert acc == pytest.approx((90 + 240) / 400) and se == pytest.approx(math.sqrt(acc * (1 - acc) / 400))
    assert pooled_accuracy([1.0], [10]) == (1.0, 0.0)
    for accs, sizes in (([0.9], [10, 20]), ([], []), ([0.5], [0])):
        with pytest.raises(ConfigError, match="pooled_accuracy"):
            pooled_accuracy(accs, sizes)


@pytest.mark.parametrize("claim,delta,side", [("greater", 0, "above 0"), ("less", 0, "below 0"),
                                              ("no_worse", 0.02, "above -0.02"), ("no_greater", 0.1, "below 0.1")])
def test_a_comparison_names_the_side_its_interval_must_lie_on(claim, delta, side):
    assert compare([1.0, 2.0], [0.0, 0.5], claim, delta).side == side
