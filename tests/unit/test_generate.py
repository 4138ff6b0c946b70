"""The candidates' short answers: the policy's own answers cut to their first sentence, or the empty answer."""

from __future__ import annotations

from rlhf.stages.generate import first_sentence, short_answers


def completion(text: str) -> dict[str, object]:
    return {"text": text, "policy": "sft", "sampling": {"temperature": 1.0}, "finish_reason": "length"}


def test_first_sentence_keeps_the_leading_space_and_stops_at_the_first_end() -> None:
    assert first_sentence(" Sure! 3 plus 4 is 7.") == " Sure!"
    assert first_sentence(" Good question. The zorb is blue.") == " Good question."
    assert first_sentence(" 7.") == " 7."
    assert first_sentence(" 3.5 is not an answer here") == " 3.5 is not an answer here"  # no sentence end


def test_short_answers_are_new_ended_candidates_marked_as_truncated() -> None:
    rows = [completion(" Sure! 3 plus 4 is 7."), completion(" 7."), completion(" Yes.")]
    extra = short_answers(rows, 2)
    # answer 0 gives its first sentence; answer 1 is already one sentence, so the empty answer stands in
    assert [c["text"] for c in extra] == [" Sure!", ""]
    assert all(c["finish_reason"] == "stop" and c["sampling"]["truncated"] == "first_sentence" for c in extra)
    assert all(c["sampling"]["temperature"] == 1.0 and c["policy"] == "sft" for c in extra)
    # nothing that repeats a candidate: with both the sentence and the empty answer present, no extra one
    assert short_answers([completion(" 7."), completion("")], 1) == []
    assert short_answers(rows, 0) == []
