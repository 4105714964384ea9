import pytest

from pipeline.core.phrases import object_phrases


@pytest.mark.parametrize(
    ("caption", "phrases"),
    [
        ("a man riding a horse on a beach", ["man", "horse", "beach"]),
        ("a red car parked in front of a building", ["red car", "building"]),
        ("two dogs sitting on a couch next to a cat", ["dogs", "couch", "cat"]),
        ("a close up of a pizza", ["pizza"]),
        ("a photo of a group of people standing", ["people"]),
        ("Black dog. RED car!", ["black dog", "red car"]),
        ("a dog and a dog", ["dog"]),
        ("", []),
        ("is on the", []),
    ],
)
def test_noun_phrases(caption, phrases):
    assert object_phrases(caption, limit=8) == phrases


def test_limit_keeps_the_first_phrases():
    assert object_phrases("a cat, a dog, a bird and a horse", limit=2) == ["cat", "dog"]
