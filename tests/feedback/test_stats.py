"""rlhf/feedback/stats.py: Krippendorff's alpha and agreement against hand-computed values."""

from __future__ import annotations

import pytest

from rlhf.feedback.stats import agreement, krippendorff_alpha_nominal


def test_alpha_on_krippendorffs_own_example() -> None:
    # Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", nominal data with missing values:
    # 4 coders x 12 units; alpha = 0.743.
    coders = [
        [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
        [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
        [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
        [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None],
    ]
    units = [[v for v in unit if v is not None] for unit in zip(*coders, strict=True)]
    assert krippendorff_alpha_nominal(units) == pytest.approx(0.743, abs=5e-4)


# Tiny fixed vote set, computed by hand:
#   t1: ann A, bob A, cat B   t2: ann B, bob B, cat B   t3: ann A, bob B   t4: ann tie (alone)   t5: ann tie, bob tie
# Coincidences (t4 not pairable): o_AA = 1, o_AB = o_BA = 1 + 1 = 2, o_BB = 3, o_tt = 2
#   n_A = 3, n_B = 5, n_tie = 2, n = 10
#   alpha = 1 - (n - 1) * sum_{c!=k} o_ck / sum_{c!=k} n_c n_k = 1 - 9 * 4 / (2 * (15 + 6 + 10)) = 13/31
# Agreement (pairs with every other labeler on the same task):
#   ann: t1 bob=, cat!=; t2 bob=, cat=; t3 bob!=; t5 bob= -> 4/6;  bob: likewise 4/6;  cat: t1 !=, !=; t2 =, = -> 2/4
VOTES = {
    "t1": {"ann": "A", "bob": "A", "cat": "B"},
    "t2": {"ann": "B", "bob": "B", "cat": "B"},
    "t3": {"ann": "A", "bob": "B"},
    "t4": {"ann": "tie"},
    "t5": {"ann": "tie", "bob": "tie"},
}
ALPHA = 13 / 31
AGREEMENT = {"ann": (4, 6), "bob": (4, 6), "cat": (2, 4)}


def test_alpha_and_agreement_by_hand() -> None:
    assert krippendorff_alpha_nominal([list(v.values()) for v in VOTES.values()]) == pytest.approx(ALPHA)
    assert agreement({i: v for i, v in enumerate(VOTES.values())}) == AGREEMENT


def test_alpha_undefined_cases() -> None:
    assert krippendorff_alpha_nominal([]) is None
    assert krippendorff_alpha_nominal([["A"], ["B"]]) is None  # nothing pairable
    assert (
        krippendorff_alpha_nominal([["A", "A"], ["A", "A"]]) is None
    )  # one category: no expected disagreement
    assert krippendorff_alpha_nominal([["A", "A"], ["B", "B"]]) == 1.0
    assert krippendorff_alpha_nominal([["A", "B"], ["B", "A"]]) < 0


def test_project_stats_over_the_api(api) -> None:
    """The same vote set cast through the API, plus gold items and vote times."""
    rows = [{"prompt": t, "prompt_id": t, "completions": [{"text": "x"}, {"text": "y"}]} for t in VOTES]
    gold = [
        {"prompt": "g1", "completion_a": "good", "completion_b": "bad", "choice": "A"},
        {"prompt": "g2", "completion_a": "bad", "completion_b": "good", "choice": "B"},
    ]
    response = api.post(
        "admin", "/api/projects/demo/import", json={"candidates": rows, "gold": gold, "overlap": 3}
    )
    assert response.status_code == 201
    times = {"ann": [1000, 3000, 2000, 5000, 4000], "bob": [500, 700, 900, 1100], "cat": [100, 300]}
    for task_id, (name_t, answers) in enumerate(VOTES.items(), start=1):
        for name, choice in answers.items():
            time_ms = times[name][sum(1 for t in list(VOTES)[: task_id - 1] if name in VOTES[t])]
            assert api.vote(name, task_id, choice=choice, time_to_vote_ms=time_ms).status_code == 201, name_t
    # gold: ann gets both right, bob one of two; (gold votes count for agreement too: ann/bob agree on g1)
    for name, answers in {"ann": ["A", "B"], "bob": ["A", "A"]}.items():
        for task_id, choice in zip((6, 7), answers, strict=True):
            assert api.vote(name, task_id, choice=choice).status_code == 201
    stats = api.get("admin", "/api/projects/demo/stats").json()
    by_name = {s["labeler"]: s for s in stats["labelers"]}
    assert stats["votes"] == 15 and stats["tasks"] == 7
    # with the two gold units: t6 ann A bob A -> o_AA += 2; t7 ann B bob A -> o_AB, o_BA += 1
    # n_A = 3 + 2 + 1 = 6, n_B = 5 + 1 = 6, n_tie = 2, n = 14, disagreements 4 + 2 = 6
    # alpha = 1 - 13 * 6 / (2 * (36 + 12 + 12)) = 1 - 78/120 = 0.35
    assert stats["alpha"] == pytest.approx(0.35)
    assert by_name["ann"]["votes"] == 7 and by_name["cat"]["votes"] == 2
    assert by_name["ann"]["agreement"] == pytest.approx(5 / 8) and by_name["ann"]["agreement_pairs"] == 8
    assert by_name["cat"]["agreement"] == pytest.approx(2 / 4)
    assert by_name["ann"]["gold_accuracy"] == 1.0 and by_name["bob"]["gold_accuracy"] == 0.5
    assert by_name["cat"]["gold_accuracy"] is None
    assert by_name["ann"]["median_time_ms"] == 3000 and by_name["bob"]["median_time_ms"] == 800
