"""QA metrics against worked examples (SQuAD v1.1 normalisation, aliases, yes/no extraction)."""

import pytest

from regrad_cli.learning.scores import (bootstrap_ci, exact_match, f1_score, gold_retrieved, normalize_answer, paired_bootstrap,
                                yes_no_accuracy, yes_no_label)


@pytest.mark.parametrize("raw, norm", [
    ("The Eiffel Tower", "eiffel tower"),
    ("  an   Apple, a pear!  ", "apple pear"),
    ("U.S.A.", "usa"),
    ("Theatre", "theatre"),          # 'the' only as a whole word
    ("A-ha", "aha"),                 # punctuation removed, not replaced by a space
    ("Rock 'n' Roll", "rock n roll"),
    ("", ""),
])
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def test_exact_match_ignores_case_articles_punctuation():
    assert exact_match("the Beatles.", ["Beatles"]) == 1.0
    assert exact_match("Beatles band", ["Beatles"]) == 0.0


def test_exact_match_max_over_aliases():
    assert exact_match("JFK", ["John F. Kennedy", "JFK"]) == 1.0
    assert exact_match("Kennedy", ["John F. Kennedy", "JFK"]) == 0.0


def test_f1_worked_example():
    # prediction tokens: [john, kennedy]; gold: [john, f, kennedy] -> P = 1, R = 2/3, F1 = 0.8
    assert f1_score("John Kennedy", ["John F. Kennedy"]) == pytest.approx(0.8)
    # 'the' is dropped: [in, year, 1887, perhaps] vs [1887, ad] -> P = 1/4, R = 1/2, F1 = 1/3
    assert f1_score("in the year 1887 perhaps", ["1887 AD"]) == pytest.approx(1 / 3)


def test_f1_max_over_aliases_and_counts_repeats_once():
    assert f1_score("Paris", ["London", "Paris, France"]) == pytest.approx(2 / 3)
    # Counter intersection: a repeated predicted token matches one gold occurrence only.
    assert f1_score("new new york", ["new york"]) == pytest.approx(0.8)


def test_f1_empty_cases():
    assert f1_score("", ["answer"]) == 0.0
    assert f1_score("the", ["a"]) == 1.0  # both normalise to empty
    assert f1_score("x", []) == 0.0


@pytest.mark.parametrize("pred, label", [
    ("Yes.", "yes"),
    ("No, it does not.", "no"),
    ("Maybe; the evidence is mixed", "maybe"),
    ("The answer is yes", "yes"),
    ("It is unclear", None),
    ("Nobody knows", None),           # 'nobody' is not 'no'
])
def test_yes_no_label(pred, label):
    assert yes_no_label(pred) == label


def test_yes_no_accuracy():
    assert yes_no_accuracy("yes, clearly", ["yes"]) == 1.0
    assert yes_no_accuracy("No", ["yes"]) == 0.0
    assert yes_no_accuracy("I cannot say", ["maybe"]) == 0.0


def test_gold_retrieved_by_text_or_chunk():
    gold = "Velmora Ridge Observatory\nThe observatory was founded in 1887 by Corwen Aldish."
    assert gold_retrieved([gold], [gold]) == 1.0
    assert gold_retrieved(["unrelated", "The observatory was  founded in 1887"], [gold]) == 1.0
    assert gold_retrieved(["other text"], [gold]) == 0.0
    assert gold_retrieved([], [gold]) == 0.0
    assert gold_retrieved(["x"], []) is None


def test_bootstrap_ci_is_seeded_and_brackets_the_mean():
    vals = [0.0, 1.0, 0.5, 0.25, 1.0, 0.0, 0.75]
    a = bootstrap_ci(vals, resamples=500, seed=3)
    assert a == bootstrap_ci(vals, resamples=500, seed=3)
    std, lo, hi = a
    assert lo <= sum(vals) / len(vals) <= hi and std > 0
    assert bootstrap_ci([1.0, 1.0]) == (0.0, 1.0, 1.0)


def test_paired_bootstrap_identical_systems():
    vals = [0.0, 1.0, 0.5, 0.25, 1.0, 0.0, 0.75]
    c = paired_bootstrap(vals, vals, resamples=500, seed=1)
    assert c["diff"] == 0.0 and c["ci95"] == [0.0, 0.0] and c["p_value"] == 1.0 and not c["significant"]


def test_paired_bootstrap_clear_gap_is_significant():
    a = [1.0, 0.8, 0.9, 1.0, 0.7, 0.9, 1.0, 0.8] * 5
    b = [0.1, 0.0, 0.2, 0.0, 0.1, 0.3, 0.0, 0.1] * 5
    c = paired_bootstrap(a, b, resamples=1000, seed=0)
    assert c["significant"] and c["ci95"][0] > 0 and c["diff"] == pytest.approx(sum(a) / 40 - sum(b) / 40)
    assert c["p_value"] == pytest.approx(2 / 1001)
    assert paired_bootstrap(b, a, resamples=1000, seed=0)["ci95"][1] < 0
    # Pairing matters: the same scores shuffled against each other are not a clear gap.
    noisy = paired_bootstrap([1, 0, 1, 0, 1, 0], [0, 1, 0, 1, 1, 0], resamples=1000, seed=0)
    assert not noisy["significant"] and noisy["p_value"] > 0.5
    with pytest.raises(ValueError):
        paired_bootstrap([1.0], [1.0, 0.0])
