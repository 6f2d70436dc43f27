"""The alt-text rules (pipeline.export.alt_text) on realistic captions."""

from __future__ import annotations

import pytest

from pipeline.export.alt_text import DEFAULT_MAX_CHARS, ELLIPSIS, alt_text, first_sentence, strip_openers

# A Moondream-style "normal" caption: several sentences, an opener, detail after the first sentence.
MOONDREAM = (
    "The image shows a golden retriever lying on a wooden porch next to a red door. The dog's fur is "
    "slightly wet, and a blue leash hangs from the railing. Sunlight falls across the boards."
)


@pytest.mark.parametrize(
    "caption, expected",
    [
        (MOONDREAM, "A golden retriever lying on a wooden porch next to a red door."),
        ("a picture of a red car parked on a street", "A red car parked on a street."),
        ("An image of two children playing chess.", "Two children playing chess."),
        ("This image shows a bowl of ramen", "A bowl of ramen."),
        ("In this image, we can see a lighthouse on a cliff.", "A lighthouse on a cliff."),
        ("The photo depicts a crowded market at night!", "A crowded market at night!"),
        ("Photo of a cat. Image of a dog.", "A cat."),
        ("This is an image of a bridge over a river", "A bridge over a river."),
        ("a close-up photo of a bee on a sunflower", "A bee on a sunflower."),
        ("   a   sailboat\n on   calm water  ", "A sailboat on calm water."),
        ("Is this a cat? It looks like one.", "Is this a cat?"),
    ],
)
def test_alt_text_is_the_first_sentence_without_openers(caption, expected):
    assert alt_text(caption) == expected


def test_abbreviations_and_decimals_do_not_end_the_sentence():
    assert first_sentence("Mr. Smith walks past St. Mary's church at 3.5 km. Then rain.") == (
        "Mr. Smith walks past St. Mary's church at 3.5 km."
    )
    assert alt_text("A sign reading 'Open 24 hrs.' in neon. Behind it, a street.") == "A sign reading 'Open 24 hrs.' in neon."


def test_openers_are_only_removed_at_the_start():
    assert alt_text("A woman holding a picture of her grandmother.") == "A woman holding a picture of her grandmother."
    assert strip_openers("image of") == "image of"  # nothing left after it: keep the words


def test_long_sentences_are_cut_on_a_word_boundary_with_an_ellipsis():
    caption = (
        "A large group of hikers in bright jackets walking along a narrow mountain ridge above a valley "
        "filled with low clouds and scattered pine trees under a pale sky"
    )
    text = alt_text(caption)
    assert len(text) <= DEFAULT_MAX_CHARS and text.endswith(ELLIPSIS)
    body = text[: -len(ELLIPSIS)]
    assert caption.startswith(body) and caption[len(body)] == " "  # ends where a word ends
    assert body.split()[-1].lower() not in {"a", "the", "and", "with", "of", "under"}


@pytest.mark.parametrize("max_chars", [20, 40, 80, 125, 200])
def test_every_cap_is_respected(max_chars):
    text = alt_text(MOONDREAM + " " + "word " * 100, max_chars)
    assert len(text) <= max_chars and text[0].isupper() and text[-1] in ".!?" + ELLIPSIS


def test_cut_drops_dangling_words():
    assert alt_text("A man riding a bike with a dog and a cat in the park", 34) == "A man riding a bike with a dog…"


def test_one_word_longer_than_the_cap_is_cut_hard():
    assert alt_text("Supercalifragilisticexpialidocious", 20) == "Supercalifragilisti" + ELLIPSIS


@pytest.mark.parametrize("caption", [None, "", "   ", "...", "?!"])
def test_nothing_to_describe_gives_none(caption):
    assert alt_text(caption) is None


def test_text_already_within_the_rules_is_unchanged():
    assert alt_text("Two swans on a lake.") == "Two swans on a lake."
    assert alt_text('A poster that says "Sale".') == 'A poster that says "Sale".'
