"""Preference formats: round trips, HH splitting, ranking/rating/vote -> pairs, auto-detection, file:line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from rlhf.data.jsonl import write_jsonl
from rlhf.data.preferences import (
    ConversationalPair,
    Feedback,
    Message,
    PairwiseVote,
    PreferenceGroup,
    PreferencePair,
    Ranking,
    Rating,
    group_to_pairs,
    group_to_ranking,
    pair_to_hh,
    pair_to_vote,
    pairs_to_ranking,
    ranking_to_group,
    ratings_to_groups,
    read_preference_groups,
    read_preferences,
    record_from_json,
    record_to_json,
    render_conversational,
    render_feedback,
    split_hh,
    to_groups,
    vote_to_pair,
    vote_to_ranking,
    write_preferences,
)
from rlhf.errors import DataError

HH_PROMPT = "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: What is 2+2?\n\nAssistant:"


def chatml(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """A tiny chat template in the ChatML style, enough to check how conversational pairs are cut."""
    text = "".join(f"<|{m['role']}|>{m['content']}<|end|>\n" for m in messages)
    return text + ("<|assistant|>" if add_generation_prompt else "")


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# --- round trips ---------------------------------------------------------------------------------------


ALL_RECORDS = [
    PreferencePair("What is 2+2?", " 4", " 5", margin=1.5, labeler="ann"),
    PreferencePair("héllo ✓", "line one\nline two", ""),
    ConversationalPair(
        prompt=[Message("system", "Be brief."), Message("user", "Hi")],
        chosen=[Message("assistant", "Hello!")],
        rejected=[Message("assistant", "Hello, you fool."), Message("assistant", "Really.")],
        margin=0.0,
        labeler="bob",
    ),
    PairwiseVote(
        "Capital of Zorbia?",
        "Plin.",
        "I don't know, and I don't care.",
        "both_bad",
        labeler="bob",
        meta={"task_id": 7, "policy": {"a": "v1", "b": "v2"}, "tags": ["demo"]},
    ),
    PairwiseVote("Thanks!", "You're welcome.", "Whatever.", "B", margin=0.25),
    Ranking("Say hi", ["hi", "hello", "hey there", "go away"], [2, 1, 2, 3], labeler="cy", meta={"k": 4}),
    Rating("Say hi", "hello", 4.5, labeler="ann", meta={"scale": "1-7"}),
    Rating("Say hi", "go away", -1.0),
]


def test_every_format_round_trips_exactly_through_a_file(tmp_path: Path) -> None:
    path = tmp_path / "prefs.jsonl"
    assert write_preferences(path, ALL_RECORDS) == len(ALL_RECORDS)
    assert read_preferences(path) == ALL_RECORDS

    # each record is written in its own format, None fields and an empty meta left out
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert set(rows[0]) == {"prompt", "chosen", "rejected", "margin", "labeler"}
    assert set(rows[1]) == {"prompt", "chosen", "rejected"}
    assert rows[2]["prompt"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]
    assert set(rows[3]) == {"prompt", "completion_a", "completion_b", "choice", "labeler", "meta"}
    assert rows[3]["meta"]["policy"] == {"a": "v1", "b": "v2"}
    assert rows[5]["ranking"] == [2, 1, 2, 3]
    assert rows[7] == {"prompt": "Say hi", "completion": "go away", "rating": -1.0}


@pytest.mark.parametrize("record", ALL_RECORDS, ids=lambda r: type(r).__name__)
def test_record_json_round_trip(record: object) -> None:
    assert record_from_json(record_to_json(record)) == record  # type: ignore[arg-type]


def test_explicit_format_reads_the_same_records(tmp_path: Path) -> None:
    votes = [r for r in ALL_RECORDS if isinstance(r, PairwiseVote)]
    path = tmp_path / "votes.jsonl"
    write_preferences(path, votes)
    assert read_preferences(path, fmt="vote") == votes
    with pytest.raises(DataError, match=r"votes\.jsonl:1: unknown field 'choice' in a ranking record"):
        read_preferences(path, fmt="ranking")


def test_vote_axes_as_the_labeling_app_exports_them_are_read_into_meta(tmp_path: Path) -> None:
    row = {"prompt": "p", "completion_a": "a", "completion_b": "b", "choice": "B", "labeler": "ann",
           "axes": {"helpful": "B", "honest": "same"}, "meta": {"task_id": 3}}  # fmt: skip
    path = write_lines(tmp_path / "votes.jsonl", [json.dumps(row)])
    (vote,) = read_preferences(path)
    assert vote == PairwiseVote(
        "p", "a", "b", "B", "ann", meta={"task_id": 3, "axes": {"helpful": "B", "honest": "same"}}
    )
    assert to_groups([vote])[0].pairs == [(0, 1)] and to_groups([vote])[0].completions == ["b", "a"]
    write_lines(path, [json.dumps({**row, "axes": {"helpful": "C"}})])
    with pytest.raises(DataError, match=r"votes\.jsonl:1: axes\['helpful'\] should be one of A, B, same"):
        read_preferences(path)


def test_rating_read_as_float_and_json_integers_accepted(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "r.jsonl", ['{"prompt": "p", "completion": "c", "rating": 4, "labeler": "a"}']
    )
    (record,) = read_preferences(path)
    assert isinstance(record, Rating) and record.rating == 4.0 and isinstance(record.rating, float)


def test_write_refuses_a_record_that_would_not_read_back(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    bad = [ALL_RECORDS[0], Ranking("p", ["only one"], [1])]
    with pytest.raises(
        DataError, match=r"out\.jsonl: record 2: a ranking needs at least 2 completions, got 1"
    ):
        write_preferences(path, bad)
    assert not path.exists()  # nothing half-written
    with pytest.raises(DataError, match="record 1: field 'margin' should be a finite number"):
        write_preferences(path, [PreferencePair("p", "a", "b", margin=float("nan"))])


# --- Anthropic HH ---------------------------------------------------------------------------------------


def test_split_hh_splits_at_the_last_assistant_turn() -> None:
    transcript = HH_PROMPT + " 4."
    prompt, reply = split_hh(transcript)
    assert prompt == HH_PROMPT  # keeps the earlier assistant turn, ends with the last "\n\nAssistant:"
    assert reply == " 4."
    assert prompt + reply == transcript
    with pytest.raises(ValueError, match="no '\\\\n\\\\nAssistant:' turn"):
        split_hh("\n\nHuman: Hi")


def test_hh_rows_read_as_pairs_with_the_prompt_split_off(tmp_path: Path) -> None:
    row = {"chosen": HH_PROMPT + " 4.", "rejected": HH_PROMPT + " 5, you fool."}
    path = tmp_path / "hh.jsonl"
    write_jsonl(path, [row])
    assert read_preferences(path) == [PreferencePair(HH_PROMPT, " 4.", " 5, you fool.")]
    assert read_preferences(path, fmt="hh") == read_preferences(path)


def test_hh_round_trips_through_pair_to_hh(tmp_path: Path) -> None:
    pair = PreferencePair(HH_PROMPT, " 4.", " 5.")
    path = tmp_path / "hh.jsonl"
    write_jsonl(path, [pair_to_hh(pair)])
    assert read_preferences(path) == [pair]
    with pytest.raises(ValueError, match="prompt ending in"):
        pair_to_hh(PreferencePair("no assistant tag", "a", "b"))


def test_hh_prompts_that_disagree_are_an_error_naming_the_line(tmp_path: Path) -> None:
    good = json.dumps({"chosen": HH_PROMPT + " 4.", "rejected": HH_PROMPT + " 5."})
    other = HH_PROMPT.replace("Hello!", "Hey.")
    bad = json.dumps({"chosen": HH_PROMPT + " 4.", "rejected": other + " 5."})
    path = write_lines(tmp_path / "hh.jsonl", [good, bad])
    with pytest.raises(DataError, match=r"hh\.jsonl:2: 'chosen' and 'rejected' have different prompts"):
        read_preferences(path)


# --- rankings, ratings, votes -> pairs -----------------------------------------------------------------


def test_k4_ranking_gives_all_six_pairs_in_one_group() -> None:
    ranking = Ranking("p", ["w", "x", "y", "z"], [2, 1, 4, 3], labeler="ann")
    group = ranking_to_group(ranking)
    assert group is not None
    assert group.completions == ["w", "x", "y", "z"]
    # (chosen, rejected) in (i, j) order, i < j: x>w, w>y, w>z, x>y, x>z, z>y
    assert group.pairs == [(1, 0), (0, 2), (0, 3), (1, 2), (1, 3), (3, 2)]
    assert group.margins == [None] * 6
    assert group.labeler == "ann"


def test_ranking_with_a_tie_gives_fewer_pairs() -> None:
    group = ranking_to_group(Ranking("p", ["a", "b", "c", "d"], [1, 2, 2, 3]))
    assert group is not None
    assert group.pairs == [(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)]  # b and c tie: no (1, 2)
    assert ranking_to_group(Ranking("p", ["a", "b"], [1, 1])) is None


def test_ranking_with_repeated_completion_text_counts_it_once() -> None:
    group = ranking_to_group(Ranking("p", ["x", "y", "x"], [1, 2, 1]))
    assert group == PreferenceGroup("p", ["x", "y"], [(0, 1)], [None])


def test_ratings_make_pairs_only_within_one_prompt_and_labeler() -> None:
    ratings = [
        Rating("p1", "a", 5, "ann"),
        Rating("p1", "b", 2, "ann"),
        Rating("p1", "d", 4, "bob"),  # bob's scale: never compared with ann's
        Rating("p1", "c", 5, "ann"),
        Rating("p2", "a", 1, "ann"),
        Rating("p1", "e", 1, "bob"),
        Rating("p1", "f", 4, "ann"),
        Rating("p2", "b", 1, "ann"),  # p2: equal ratings, no pair, no group
    ]
    ann, bob = ratings_to_groups(ratings)
    assert (ann.prompt, ann.labeler, ann.completions) == ("p1", "ann", ["a", "b", "c", "f"])
    # a=5 b=2 c=5 f=4: a>b, a>f, c>b, f>b, c>f; a and c tie
    assert ann.pairs == [(0, 1), (0, 3), (2, 1), (3, 1), (2, 3)]
    assert ann.margins == [None] * 5
    assert (bob.prompt, bob.labeler, bob.completions, bob.pairs) == ("p1", "bob", ["d", "e"], [(0, 1)])

    ann_m, bob_m = ratings_to_groups(ratings, margin=True)
    assert ann_m.margins == [3.0, 1.0, 3.0, 2.0, 1.0]
    assert bob_m.margins == [3.0]


def test_a_completion_rated_twice_counts_with_its_mean() -> None:
    ratings = [Rating("p", "x", 2, "ann"), Rating("p", "y", 3, "ann"), Rating("p", "x", 4, "ann")]
    ratings.append(Rating("p", "z", 1, "ann"))
    (group,) = ratings_to_groups(ratings)
    assert group.completions == ["x", "y", "z"]
    assert group.pairs == [(0, 2), (1, 2)]  # x's mean 3 ties y: no x-y pair


def test_votes_become_pairs_except_tie_and_both_bad() -> None:
    vote_a = PairwiseVote("p", "a", "b", "A", labeler="ann", margin=0.5, meta={"task_id": 1})
    vote_b = PairwiseVote("p", "a", "b", "B", labeler="bob")
    assert vote_to_pair(vote_a) == PreferencePair("p", "a", "b", margin=0.5, labeler="ann")
    assert vote_to_pair(vote_b) == PreferencePair("p", "b", "a", labeler="bob")
    assert vote_to_pair(PairwiseVote("p", "a", "b", "tie")) is None
    assert vote_to_pair(PairwiseVote("p", "a", "b", "both_bad")) is None


def test_vote_ranking_and_pair_conversions() -> None:
    pair = PreferencePair("p", "a", "b", margin=2.0, labeler="ann")
    assert vote_to_pair(pair_to_vote(pair)) == pair
    tie = PairwiseVote("p", "a", "b", "tie", labeler="ann", meta={"t": 1})
    assert vote_to_ranking(tie) == Ranking("p", ["a", "b"], [1, 1], "ann", {"t": 1})
    assert vote_to_ranking(PairwiseVote("p", "a", "b", "B")) == Ranking("p", ["a", "b"], [2, 1])
    assert vote_to_ranking(PairwiseVote("p", "a", "b", "both_bad")) is None


def test_ranking_round_trips_through_its_group_and_pairs() -> None:
    ranking = Ranking("p", ["a", "b", "c", "d"], [2, 1, 2, 3], labeler="ann")
    group = ranking_to_group(ranking)
    assert group is not None
    assert group_to_ranking(group) == ranking
    pairs = group_to_pairs(group)
    assert [(p.chosen, p.rejected) for p in pairs] == [
        ("b", "a"),
        ("a", "d"),
        ("b", "c"),
        ("b", "d"),
        ("c", "d"),
    ]
    back = pairs_to_ranking(pairs)
    assert back is not None
    assert dict(zip(back.completions, back.ranking, strict=True)) == {"a": 2, "b": 1, "c": 2, "d": 3}


def test_pairs_that_no_ranking_holds_give_none() -> None:
    def pair(chosen: str, rejected: str) -> PreferencePair:
        return PreferencePair("p", chosen, rejected)

    assert pairs_to_ranking([pair("a", "b"), pair("b", "c"), pair("a", "c")]) == Ranking(
        "p", ["a", "b", "c"], [1, 2, 3]
    )
    assert pairs_to_ranking([pair("a", "b"), pair("b", "c")]) is None  # a ranking would also say a > c
    assert pairs_to_ranking([pair("a", "b"), pair("b", "a")]) is None  # a cycle
    with pytest.raises(ValueError, match="one prompt"):
        pairs_to_ranking([pair("a", "b"), PreferencePair("q", "a", "b")])


# --- conversational data -------------------------------------------------------------------------------


def test_conversational_pair_renders_through_the_chat_template() -> None:
    conv = ALL_RECORDS[2]
    assert isinstance(conv, ConversationalPair)
    pair = render_conversational(conv, chatml)
    assert pair.prompt == "<|system|>Be brief.<|end|>\n<|user|>Hi<|end|>\n<|assistant|>"
    assert pair.chosen == "Hello!<|end|>\n"
    assert pair.rejected == "Hello, you fool.<|end|>\n<|assistant|>Really.<|end|>\n"
    assert (pair.margin, pair.labeler) == (0.0, "bob")


def test_judgements_on_a_conversation_render_through_the_chat_template() -> None:
    """A vote, ranking or rating whose meta holds the conversation (the labeling app's export of recorded chats)
    trains on the chat template's text, as the conversational pair of the same judgement does."""
    chat = [{"role": "user", "content": "Hi"}]
    meta = {"prompt_messages": chat}
    vote = PairwiseVote("user: Hi", "Hello!", "Go away.", "A", "ann", meta=meta)
    (group,) = to_groups([vote], render=chatml)
    (pair,) = to_groups([ConversationalPair([Message("user", "Hi")], [Message("assistant", "Hello!")],
                                            [Message("assistant", "Go away.")], labeler="ann")], render=chatml)  # fmt: skip
    assert group == pair
    assert group.prompt == "<|user|>Hi<|end|>\n<|assistant|>" and group.completions[0] == "Hello!<|end|>\n"
    ranked = to_groups([Ranking("user: Hi", ["a", "b"], [2, 1], meta=meta)], render=chatml)
    assert ranked[0].completions == ["a<|end|>\n", "b<|end|>\n"]
    rated = to_groups([Rating("user: Hi", "a", 1.0, "ann", meta), Rating("user: Hi", "b", 3.0, "ann", meta)],
                      render=chatml)  # fmt: skip
    assert rated[0].prompt == group.prompt and rated[0].pairs == [(1, 0)]
    # without a template, or without the conversation, the text as it is
    assert to_groups([vote])[0].prompt == "user: Hi"
    assert to_groups([replace(vote, meta={})], render=chatml)[0].prompt == "user: Hi"


def test_conversational_needs_a_template_that_keeps_the_prompt() -> None:
    conv = ALL_RECORDS[2]
    assert isinstance(conv, ConversationalPair)

    def date_stamped(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return ("<today>" if add_generation_prompt else "") + chatml(messages, add_generation_prompt)

    with pytest.raises(ValueError, match="renders the prompt differently"):
        render_conversational(conv, date_stamped)
    with pytest.raises(ValueError, match="pass render="):
        to_groups([conv])
    (group,) = to_groups([conv], render=chatml)
    assert group.completions == ["Hello!<|end|>\n", "Hello, you fool.<|end|>\n<|assistant|>Really.<|end|>\n"]


def test_a_conversation_the_chat_template_refuses_names_its_file_and_record(tmp_path: Path) -> None:
    """A template that raises (Gemma's, on a system turn): one line with the file, the record and the
    template's reason, for the reward model and DPO alike."""
    import jinja2

    class Refusing:
        chat_template = "gemma-like"

        def apply_chat_template(self, messages: list[dict[str, str]], **_: object) -> str:
            if messages[0]["role"] == "system":
                raise jinja2.exceptions.TemplateError("System role not supported")
            return chatml(messages, False)

    def row(system: bool) -> dict[str, object]:
        prompt = [{"role": "user", "content": "Q?"}]
        return {"prompt": ([{"role": "system", "content": "Be brief."}] if system else []) + prompt,
                "chosen": [{"role": "assistant", "content": "A."}], "rejected": [{"role": "assistant", "content": "B."}]}  # fmt: skip

    path = tmp_path / "prefs.jsonl"
    write_jsonl(path, [row(False), row(True)])
    with pytest.raises(DataError, match=r"prefs.jsonl: record 2: the chat template cannot render these messages: "
                                        r"System role not supported"):  # fmt: skip
        read_preference_groups(str(path), "auto", Refusing())


# --- to_groups -----------------------------------------------------------------------------------------


def test_to_groups_keeps_input_order_and_places_ratings_at_their_first() -> None:
    records = [
        Rating("p1", "a", 5, "ann"),
        PreferencePair("q", "good", "bad", margin=1.0),
        PairwiseVote("v", "x", "y", "tie"),  # no pair
        Rating("p2", "x", 1, "bob"),
        PairwiseVote("v", "x", "y", "B", labeler="cy"),
        Rating("p1", "b", 2, "ann"),  # joins the p1/ann group at position 0
        Ranking("k", ["r1", "r2"], [1, 1]),  # all tied: no group
        Ranking("k", ["r1", "r2", "r3"], [3, 1, 2]),
        Rating("p2", "y", 1, "bob"),  # equal to bob's other rating: p2/bob makes no group
        PreferencePair("same", "t", "t"),  # identical texts: nothing to learn
    ]
    groups = to_groups(records)
    assert groups == [
        PreferenceGroup("p1", ["a", "b"], [(0, 1)], [None], "ann"),
        PreferenceGroup("q", ["good", "bad"], [(0, 1)], [1.0]),
        PreferenceGroup("v", ["y", "x"], [(0, 1)], [None], "cy"),
        PreferenceGroup("k", ["r1", "r2", "r3"], [(1, 0), (2, 0), (1, 2)], [None, None, None]),
    ]
    assert to_groups(records) == groups  # deterministic
    assert [g.prompt for g in to_groups(records[::-1])] == ["k", "p1", "v", "q"]
    assert to_groups(records, rating_margins=True)[0].margins == [3.0]


# --- auto-detection and errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"prompt": "p", "chosen": "a", "rejected": "b"}, PreferencePair("p", "a", "b")),
        ({"chosen": HH_PROMPT + " a", "rejected": HH_PROMPT + " b"}, PreferencePair(HH_PROMPT, " a", " b")),
        (
            {
                "prompt": [{"role": "user", "content": "p"}],
                "chosen": [{"role": "assistant", "content": "a"}],
                "rejected": [{"role": "assistant", "content": "b"}],
            },
            ConversationalPair(
                [Message("user", "p")], [Message("assistant", "a")], [Message("assistant", "b")]
            ),
        ),
        ({"prompt": "p", "completions": ["a", "b"], "ranking": [2, 1]}, Ranking("p", ["a", "b"], [2, 1])),
        ({"prompt": "p", "completion": "a", "rating": 3.5, "labeler": "l"}, Rating("p", "a", 3.5, "l")),
        (
            {"prompt": "p", "completion_a": "a", "completion_b": "b", "choice": "tie", "meta": {"id": 3}},
            PairwiseVote("p", "a", "b", "tie", meta={"id": 3}),
        ),
        ({"prompt": "p", "completion": "a", "label": False, "source": "x"}, Feedback("p", "a", False)),
        (
            {
                "prompt": [{"role": "user", "content": "p"}],
                "completion": [{"role": "assistant", "content": "a"}],
                "label": True,
            },
            Feedback([Message("user", "p")], [Message("assistant", "a")], True),
        ),
    ],
    ids=["pairs", "hh", "conversational", "ranking", "rating", "vote", "feedback", "conversational_feedback"],
)
def test_auto_detects_each_format(tmp_path: Path, row: dict[str, object], expected: object) -> None:
    path = tmp_path / "one.jsonl"
    write_jsonl(path, [row])
    assert read_preferences(path) == [expected]


VALID = json.dumps({"prompt": "p", "completion_a": "a", "completion_b": "b", "choice": "A"})


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"prompt": "p", ', "not valid JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        ('{"prompt": "p", "completion_a": "a", "choice": "A"}', "missing field 'completion_b'"),
        ('{"prompt": 3, "chosen": "a", "rejected": "b"}', "field 'prompt' should be str, got int"),
        ('{"prompt": null, "chosen": "a", "rejected": "b"}', "field 'prompt' should be str, got null"),
        (
            '{"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}',
            "field 'margin' should be int or float",
        ),
        (
            '{"prompt": "p", "completions": ["a", "b"], "ranking": [1, 2, 3]}',
            "'ranking' has 3 ranks for 2 completions",
        ),
        (
            '{"prompt": "p", "completions": ["a", "b"], "ranking": [0, 1]}',
            "positive integers (1 = best), got 0",
        ),
        (
            '{"prompt": "p", "completions": ["a", "b"], "ranking": [true, 2]}',
            "positive integers (1 = best), got True",
        ),
        (
            '{"prompt": "p", "completions": ["a"], "ranking": [1]}',
            "a ranking needs at least 2 completions, got 1",
        ),
        (
            '{"prompt": "p", "completions": ["a", 2], "ranking": [1, 2]}',
            "field 'completions' should be a list of str",
        ),
        ('{"prompt": "p", "completion_a": "a", "completion_b": "b", "choice": "C"}', "unknown choice 'C'"),
        ('{"prompt": "p", "completion": "a", "label": 1}', "field 'label' should be bool, got int"),
        (
            '{"prompt": [{"role": "user", "content": "p"}], "completion": [{"role": "user", "content": "a"}], '
            '"label": true}',
            "field 'completion' should start with the assistant's turn",
        ),
        (
            '{"prompt": "p", "completion_a": "a", "completion_b": "b", "choice": "A", "task": 1}',
            "unknown field 'task'",
        ),
        (
            '{"prompt": "p", "completion_a": "a", "completion_b": "b", "choice": "A", "meta": []}',
            "'meta' should be dict",
        ),
        (
            '{"prompt": "p", "completion": "c", "rating": NaN}',
            "field 'rating' should be a finite number, got nan",
        ),
        (
            '{"prompt": "p", "completion": "c", "rating": true}',
            "field 'rating' should be int or float, got bool",
        ),
        (
            '{"prompt": "p", "completion": "c"}',
            "missing field 'label' (true or false: feedback) or 'rating' (a number); keys seen: ['completion', "
            "'prompt']",
        ),
        (  # a conversational feedback record without its label: not blamed on its prompt's type
            '{"prompt": [{"role": "user", "content": "p"}], "completion": [{"role": "assistant", "content": "c"}]}',
            "missing field 'label' (true or false: feedback) or 'rating' (a number)",
        ),
        ('{"chosen": "\\n\\nHuman: hi", "rejected": "x"}', "field 'chosen': no '\\n\\nAssistant:' turn"),
        (
            '{"prompt": [{"role": "user", "content": "p"}], "chosen": [{"role": "assistant", "content": "a", '
            '"name": "bot"}], "rejected": [{"role": "assistant", "content": "b"}]}',
            "chosen[0] should be {'role': str, 'content': str} and nothing else",
        ),
        (
            '{"prompt": [{"role": "user", "content": "p"}], "chosen": [], "rejected": []}',
            "field 'chosen' is an empty list of messages",
        ),
        (
            '{"prompt": [{"role": "user", "content": "p"}], "chosen": [{"role": "assistant", "content": "a"}], '
            '"rejected": [{"role": "user", "content": "b"}]}',
            "field 'rejected' should start with the assistant's turn, got roles ['user']",
        ),
        (
            '{"prompt": "p", "chosen": "a", "rejected": "b", "rating": 1}',
            "ambiguous record (looks like pairs and rating); keys seen: ['chosen', 'prompt', 'rating', 'rejected']",
        ),
        ('{"text": "hello"}', "unknown record format; keys seen: ['text']"),
    ],
)
def test_malformed_rows_name_file_and_line(tmp_path: Path, bad_line: str, message: str) -> None:
    path = write_lines(tmp_path / "data.jsonl", [VALID, "", bad_line, VALID])
    with pytest.raises(DataError) as excinfo:
        read_preferences(path)
    text = str(excinfo.value)
    assert text.startswith(f"{path}:3: "), text  # line 3: the blank line 2 still counts
    assert message in text
    assert "\n" not in text  # one line, as the CLI prints it


def test_record_from_json_prefixes_where_it_is_told() -> None:
    with pytest.raises(DataError, match=r"^x\.jsonl:7: missing field 'rejected'$"):
        record_from_json({"prompt": "p", "chosen": "a"}, where="x.jsonl:7")
    with pytest.raises(DataError, match=r"^missing field 'rejected'$"):
        record_from_json({"prompt": "p", "chosen": "a"}, fmt="pairs")


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file_is_an_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=r"empty\.jsonl: no records \(empty file\)"):
        read_preferences(path)
    with pytest.raises(DataError, match="file not found"):
        read_preferences(tmp_path / "missing.jsonl")


def test_formats_module_imports_no_torch() -> None:
    code = "import sys, rlhf.data.preferences; sys.exit('torch' in sys.modules)"
    root = Path(__file__).resolve().parents[2]
    assert subprocess.run([sys.executable, "-c", code], cwd=root, check=False).returncode == 0


def test_malformed_rows_stop_the_read_or_are_skipped_and_counted(tmp_path, caplog) -> None:
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    lines = [json.dumps(good), '{"prompt": "x"', json.dumps(good), json.dumps({**good, "chosen": 5}), "[1]"]
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"^{path}:2: not valid JSON"):
        read_preferences(path)
    with caplog.at_level("WARNING"):
        records = read_preferences(path, skip_bad_rows=True)
    assert len(records) == 2
    (message,) = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert message.startswith(f"{path}: skipped 3 malformed rows (first: {path}:2: not valid JSON")
    path.write_text('{"prompt": "x"\n{"prompt": "y"}\n')
    # the reason, not only that there is one: a wrong column mapping or format makes every row malformed
    with pytest.raises(
        DataError, match=rf"^{path}: every row is malformed \(2 rows; first: {path}:1: not valid JSON .*\)$"
    ):
        read_preferences(path, skip_bad_rows=True)


def test_reading_a_source_says_what_it_held_and_what_compares_answers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "a", "rejected": "a"},
            {"prompt": "r", "completion_a": "a", "completion_b": "b", "choice": "tie"},
            {"prompt": "s", "completions": ["a", "b", "c"], "ranking": [1, 2, 3]}]  # fmt: skip
    source = tmp_path / "mixed.jsonl"
    write_jsonl(source, rows)
    with caplog.at_level("INFO", logger="rlhf.data.preferences"):
        groups = read_preference_groups(str(source), "auto", tokenizer=None)
    assert len(groups) == 2  # the identical pair and the tie compare nothing
    assert (
        f"{source}: 4 records (2 pairs, 1 votes, 1 rankings) -> 2 judgements that compare answers"
        in caplog.text
    )


def test_a_sampled_answer_on_a_conversation_renders_as_the_policy_said_it() -> None:
    """An answer sampled after the built-in template's "Assistant:" opens with a space; as the assistant
    message's content it rendered "Assistant:  Hello!", so DPO and the reward model trained on a space token
    the policy never says. Its content is the answer without that space."""
    from rlhf.models.tokenizer import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(["User: Hi\nAssistant: Hello! Go away."] * 20, vocab_size=300)

    def render(messages: list[dict[str, str]], gen: bool) -> str:
        return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen))

    vote = PairwiseVote("User: Hi\nAssistant:", " Hello!", " Go away.", "A", "ann",
                        meta={"prompt_messages": [{"role": "user", "content": "Hi"}]})  # fmt: skip
    (group,) = to_groups([vote], render=render)
    assert group.prompt == "User: Hi\nAssistant:"
    assert group.completions == [" Hello!<|endoftext|>\n", " Go away.<|endoftext|>\n"]


def test_a_text_ranked_twice_counts_once_at_its_mean_rank() -> None:
    """["a", "b", "a"] ranked 1, 2, 3 gave both a > b and b > a: contradictory pairs, trained on."""
    assert ranking_to_group(Ranking("p", ["a", "b", "a"], [1, 2, 3])) is None  # a at 2 on average: b's rank
    group = ranking_to_group(Ranking("p", ["a", "b", "a", "c"], [1, 3, 2, 4]))
    assert group is not None and group.completions == ["a", "b", "c"]
    assert group.pairs == [(0, 1), (0, 2), (1, 2)]  # a (1.5) > b (3) > c (4), each pair once


def test_feedback_compares_nothing_for_the_reward_model_and_renders_through_a_template(
    tmp_path: Path,
) -> None:
    records = [Feedback("p", "a", True), PreferencePair("p", "a", "b"), Feedback("q", "c", False, "ann")]
    path = tmp_path / "mixed.jsonl"
    write_preferences(path, records)
    assert read_preferences(path) == records  # round trip
    assert [(g.prompt, g.completions) for g in to_groups(records)] == [("p", ["a", "b"])]
    chat = Feedback([Message("user", "hi")], [Message("assistant", "yo")], True)

    def render(messages: list[dict[str, str]], gen: bool) -> str:
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + ("<assistant>" if gen else "")

    assert render_feedback(chat, render) == Feedback("<user>hi<assistant>", "yo", True)
    assert render_feedback(records[0], None) is records[0]
    with pytest.raises(ValueError, match="need a chat template"):
        render_feedback(chat, None)
