"""plop.finetune.evidence on real numbers: the bootstrap's coverage on synthetic data with a known
effect, the sign-flip test against brute-force enumeration, Holm against a hand computation, and the
decision rule on a clear effect and on noise."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from plop.errors import ConfigError
from plop.finetune.evidence import (DecisionRule, bonferroni_confidence, decide, holm, paired_bootstrap,
                                    sign_flip_p)


def arms(rng: np.random.Generator, effect: float, seed_sd: float, item_sd: float, noise_sd: float,
         seeds: int = 5, items: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Scores of two arms on the same items at the same seeds: B's item difficulty and seed level,
    and A = B + ``effect`` + a seed effect + an item effect + seed-by-item noise on the difference."""
    b = rng.normal(size=(1, items)) + 0.3 * rng.normal(size=(seeds, 1)) + 0.1 * rng.normal(size=(seeds, items))
    diff = (effect + seed_sd * rng.normal(size=(seeds, 1)) + item_sd * rng.normal(size=(1, items))
            + noise_sd * rng.normal(size=(seeds, items)))
    return b + diff, b


def coverage(effect: float, seed_sd: float, item_sd: float, noise_sd: float, truth: float, reps: int = 300) -> float:
    rng = np.random.default_rng(7)
    hits = 0
    for rep in range(reps):
        ci = paired_bootstrap(*arms(rng, effect, seed_sd, item_sd, noise_sd), n_resamples=2_000, seed=rep)
        hits += ci.low <= truth <= ci.high
    return hits / reps


# (seed sd, item sd, seed-by-item sd) -> the range the 95 % CI's coverage falls in, 300 repetitions
# (the binomial sd at 0.95 is 0.013); the numbers the paired_bootstrap docstring states
REGIMES = {"items dominate": ((0.03, 0.1, 0.03), (0.91, 0.99)),
           "seed-by-item noise dominates (conservative)": ((0.02, 0.03, 0.3), (0.96, 1.0)),
           "seeds alone (5 are few: too narrow)": ((0.1, 0.0, 0.0), (0.80, 0.93))}


@pytest.mark.parametrize("regime", list(REGIMES))
def test_the_bootstrap_ci_covers_the_true_difference(regime):
    sds, (low, high) = REGIMES[regime]
    assert low <= coverage(0.1, *sds, truth=0.1) <= high


def test_a_zero_effect_gives_a_ci_holding_0_most_of_the_time():
    assert coverage(0.0, 0.03, 0.1, 0.1, truth=0.0) >= 0.9


def test_the_bootstrap_reports_its_inputs_and_is_deterministic():
    a, b = arms(np.random.default_rng(0), 0.2, 0.03, 0.1, 0.1)
    ci = paired_bootstrap(a, b, n_resamples=3_000, seed=4, confidence=0.9)
    assert ci == paired_bootstrap(a, b, n_resamples=3_000, seed=4, confidence=0.9)
    assert ci != paired_bootstrap(a, b, n_resamples=3_000, seed=5, confidence=0.9)
    assert ci.mean_diff == pytest.approx((a - b).mean()) and ci.low < ci.mean_diff < ci.high
    assert (ci.n_seeds, ci.n_items, ci.n_resamples, ci.confidence) == (5, 40, 3_000, 0.9)
    wider = paired_bootstrap(a, b, n_resamples=3_000, seed=4, confidence=0.99)
    assert wider.low < ci.low and wider.high > ci.high


def brute_force_p(diffs: np.ndarray) -> float:
    patterns = np.array(list(itertools.product((1, -1), repeat=len(diffs))))
    return float(np.mean(np.abs((patterns * diffs).mean(1)) >= abs(diffs.mean()) - 1e-12))


def test_sign_flip_p_is_the_exact_enumeration():
    rng = np.random.default_rng(3)
    for n in range(2, 11):
        diffs = rng.normal(0.2, 1.0, size=n)
        assert sign_flip_p(diffs) == pytest.approx(brute_force_p(diffs))
        assert sign_flip_p(np.abs(diffs)) == sign_flip_p(-np.abs(diffs)) == pytest.approx(2 / 2**n)
    assert sign_flip_p([-0.01, -0.02, -0.01, -0.03, -0.02]) == pytest.approx(2 / 32)
    assert sign_flip_p([-0.01, 0.01]) == 1.0
    one_loss = np.array([-0.03, -0.02, -0.02, -0.01, 0.01])
    assert sign_flip_p(one_loss) == pytest.approx(brute_force_p(one_loss)) and 2 / 32 < sign_flip_p(one_loss) < 1
    assert sign_flip_p(rng.normal(size=20)) > 0  # the cap: 2^20 patterns are enumerated
    with pytest.raises(ConfigError, match="at most 20"):
        sign_flip_p(np.ones(21))


def test_holm_matches_a_hand_computation():
    # sorted 0.01, 0.03, 0.04, 0.20 times 4, 3, 2, 1 -> 0.04, 0.09, 0.08 (raised to 0.09: monotone), 0.20
    assert holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.20}) == pytest.approx(
        {"a": 0.04, "b": 0.09, "c": 0.09, "d": 0.20})
    assert holm({"x": 0.5, "y": 0.6}) == {"x": 1.0, "y": 1.0}
    assert holm({"only": 0.03}) == {"only": 0.03} and holm({}) == {}
    assert bonferroni_confidence(0.95, 4) == pytest.approx(0.9875)


def test_decide_says_beats_on_a_clear_effect_and_not_on_noise():
    rng = np.random.default_rng(11)
    clear, noise = arms(rng, 0.3, 0.03, 0.1, 0.1), arms(rng, 0.0, 0.03, 0.1, 0.1)
    verdict = decide(*clear, higher_is_better=True, min_wins=4)
    assert verdict.beats and verdict.wins == 5 and verdict.seed_wins == (True,) * 5
    assert verdict.p == pytest.approx(1 / 16) and verdict.interval.low > 0
    assert not decide(*noise, higher_is_better=True, min_wins=4).beats
    assert not decide(*clear, higher_is_better=False, min_wins=4).beats  # a loss 0.3 higher loses
    loss = decide(clear[1], clear[0], higher_is_better=False, min_wins=4)
    assert loss.beats and loss.interval.high < 0


def test_a_beating_ci_is_not_enough_without_the_wins():
    rng = np.random.default_rng(2)
    a, b = arms(rng, 0.3, 0.03, 0.1, 0.1)
    a[0] = b[0] - 0.05  # A loses on the first seed
    rule = DecisionRule(min_wins=5, of_seeds=5, higher_is_better=True)
    verdict = rule.judge(a, b)
    assert verdict.wins == 4 and verdict.seed_wins[0] is False and verdict.interval.low > 0 and not verdict.beats
    assert DecisionRule(min_wins=4, of_seeds=5, higher_is_better=True).judge(a, b).beats


def test_several_placements_against_one_baseline_adjust_the_p_and_the_ci():
    rng = np.random.default_rng(5)
    a, base = arms(rng, 0.3, 0.03, 0.1, 0.1)
    rule = DecisionRule(min_wins=4, of_seeds=5, higher_is_better=True)
    noise = base + rng.normal(0, 0.05, base.shape)
    verdicts = rule.judge_all({"strong": a, "same": noise, "copy": a}, base)
    alone = rule.judge(a, base)
    assert verdicts["strong"].interval.confidence == pytest.approx(1 - 0.05 / 3)
    assert verdicts["strong"].interval.low < alone.interval.low  # the family's CI is wider
    assert {k: v.p_adjusted for k, v in verdicts.items()} == holm({k: v.p for k, v in verdicts.items()})
    # two p of 1/16 tie for smallest: the first is times 3, the second times 2 but raised to 3/16
    assert verdicts["strong"].p_adjusted == verdicts["copy"].p_adjusted == pytest.approx(3 / 16)
    same = verdicts["same"]
    assert same.p > 3 / 16 and same.p_adjusted == same.p and not same.beats  # Holm's last step: times 1
    # judged alone as one of 3, only Bonferroni's bound is known
    assert rule.judge(noise, base, n_comparisons=3).p_adjusted == pytest.approx(min(1.0, 3 * same.p))
    assert rule.judge(a, base, n_comparisons=3).p_adjusted == pytest.approx(3 / 16)
    assert verdicts["strong"].beats and verdicts["copy"].beats


def test_the_rule_is_one_sentence_and_the_verdict_is_json():
    rule = DecisionRule(min_wins=4, of_seeds=5, higher_is_better=False)
    assert rule.text.startswith("A beats B when A's held-out score is lower than B's on at least 4 of 5")
    assert "95 %" in rule.text and "below 0" in rule.text and rule.text.count(". ") == 0
    verdict = rule.judge(*arms(np.random.default_rng(1), -0.3, 0.03, 0.1, 0.1))
    back = json.loads(json.dumps(verdict.to_dict()))
    assert back["beats"] is True and back["rule"] == rule.text and back["interval"]["n_items"] == 40
    assert verdict == rule.judge(*arms(np.random.default_rng(1), -0.3, 0.03, 0.1, 0.1))  # deterministic


@pytest.mark.parametrize("a, b, message", [
    (np.zeros((5, 3)), np.zeros((4, 3)), r"one shape, got \(5, 3\) and \(4, 3\)"),
    (np.zeros(5), np.zeros(5), r"one shape, got \(5,\)"),
    (np.zeros((1, 3)), np.zeros((1, 3)), "at least 2 seeds"),
    (np.array([[0.1, np.nan]] * 5), np.zeros((5, 2)), "NaN"),
    ([[1.0, 2.0], [1.0]], [[1.0, 2.0], [1.0]], "numeric"),
])
def test_bad_input_raises_one_clear_line(a, b, message):
    with pytest.raises(ConfigError, match=message) as error:
        paired_bootstrap(a, b)
    assert "\n" not in str(error.value)


def test_bad_settings_raise_config_errors():
    a, b = np.ones((4, 2)), np.zeros((4, 2))
    for call, message in [(lambda: DecisionRule(min_wins=4, of_seeds=5, higher_is_better=True).judge(a, b),
                           "written for 5 seeds, the runs have 4"),
                          (lambda: DecisionRule(min_wins=6, of_seeds=5, higher_is_better=True), "min_wins"),
                          (lambda: paired_bootstrap(a, b, confidence=1.0), "confidence"),
                          (lambda: sign_flip_p([0.1]), "at least 2"),
                          (lambda: sign_flip_p([0.1, np.nan]), "NaN"),
                          (lambda: holm({"a": 1.5}), r"\[0, 1\]"),
                          (lambda: bonferroni_confidence(0.95, 0), "n_comparisons")]:
        with pytest.raises(ConfigError, match=message):
            call()
