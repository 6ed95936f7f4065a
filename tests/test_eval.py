"""eval.py's tag scoring, checked against counts done by hand."""
import pytest

from eval import looks_like_tags, parse_tags, tag_scores


def test_parse_tags_takes_the_first_line_split_at_commas():
    assert parse_tags(" Love, life ,, humor\nThe quote means...") == {"love", "life", "humor"}
    assert parse_tags("\n\nThe answer is") == set()


def test_tag_scores_micro_average_by_hand():
    completions = [" love, life", " books, humor, fiction", "\nI think"]
    truth = [["love", "inspirational"], ["books", "humor"], ["life"]]
    scores = tag_scores(completions, truth)
    # hits: love; books, humor -> 3. predicted: 2 + 3 + 0 = 5. true: 2 + 2 + 1 = 5.
    assert scores["precision"] == pytest.approx(3 / 5)
    assert scores["recall"] == pytest.approx(3 / 5)
    assert scores["f1"] == pytest.approx(3 / 5)
    assert scores["tag_shaped"] == pytest.approx(2 / 3)


def test_nothing_predicted_scores_zero_not_nan():
    scores = tag_scores(["\n", ""], [["love"], ["life"]])
    assert scores == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "tag_shaped": 0.0}


def test_tag_shape_refuses_prose():
    assert looks_like_tags(" attributed-no-source, be-yourself")
    assert not looks_like_tags(" This quote is about how we should all live our lives.")
