"""Object phrases of a caption: the noun phrases the grounder is asked to find.

Captions from BLIP-style models are short and formulaic ("a man riding a horse on a beach"), so a small
rule-based chunker does the job without a tagger model to download: split at function words (articles,
prepositions, conjunctions, pronouns, auxiliaries, framing words), then strip verbs (-ing/-ed forms and a
short list) from the ends of chunks of two or more words; a lone word after a function word is a noun
("a building"). What remains, de-duplicated in order, are the object phrases.
"""

from __future__ import annotations

import re

# The chunker's rules as a version: any change to the word lists or the rules below gives other phrases, hence
# other boxes, so it must be a new version of the grounding artifacts (and heads trained before are refused).
PHRASES_VERSION = "chunker:1"

_FUNCTION_WORDS = frozenset(
    """
    a an the this that these those some any each every another its his her their our my your one two three
    four five several many few of on in into onto at by with without for from to up down over under near
    behind beside besides between among through across along around above below against inside outside
    next top front back side middle while and or but nor as than then there here it they he she we you i
    is are was were be been being has have had do does did can could will would should may might must not
    very so too also just who which what where when how
    picture image photo photograph close view shot group couple pair bunch lot number kind type
    """.split()  # the last line: framing and quantity words ("a photo of", "a group of"), never objects
)
_VERBS = frozenset(
    """
    sits sit stands stand holds hold looks look walks walk rides ride plays play lies lie lays lay eats eat
    shows show wears wear flies fly runs run seems appears covered filled made
    """.split()
)
_WORD = re.compile(r"[a-z][a-z'-]*")
_PUNCTUATION = re.compile(r"[.,;:!?()\[\]\"]")


def object_phrases(caption: str, limit: int) -> list[str]:
    """Up to `limit` distinct noun phrases of `caption`, in caption order."""
    phrases: list[str] = []
    for chunk in _chunks(caption.lower()):
        phrase = " ".join(_strip_verbs(chunk))
        if phrase and phrase not in phrases:
            phrases.append(phrase)
        if len(phrases) == limit:
            break
    return phrases


def _chunks(text: str) -> list[list[str]]:
    chunks: list[list[str]] = []
    for clause in _PUNCTUATION.split(text):
        chunks.append([])
        for word in _WORD.findall(clause):
            if word in _FUNCTION_WORDS:
                chunks.append([])
            else:
                chunks[-1].append(word)
    return [chunk for chunk in chunks if chunk]


def _strip_verbs(words: list[str]) -> list[str]:
    """Drops verbs from both ends ("man riding" → "man", "parked red car" → "red car")."""
    if len(words) == 1:
        return words
    start, end = 0, len(words)
    while start < end and _is_verb(words[start]):
        start += 1
    while end > start and _is_verb(words[end - 1]):
        end -= 1
    return words[start:end]


def _is_verb(word: str) -> bool:
    # Inside a chunk, "-ing"/"-ed" words of 5+ letters are verbs ("riding", "parked"); shorter are nouns ("king").
    if word in _VERBS or len(word) < 5:
        return word in _VERBS
    return word.endswith("ing") or (word.endswith("ed") and not word.endswith("eed"))
