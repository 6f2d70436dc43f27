"""Alt text from a caption: one short, plain sentence a screen reader can read.

The rules (WCAG-style practice for alt text, applied mechanically):

  * the first sentence of the caption only;
  * no "image of" / "a picture of" / "this image shows" openers (a screen
    reader already announces an image);
  * at most ``max_chars`` characters (125 by default, the length many
    guides and CMSs suggest), cut on a word boundary, never mid-word unless
    one word alone is longer than the limit; a cut sentence ends in "…",
    without a dangling "and" / "of the";
  * starts with a capital letter and ends with punctuation.

When OCR read legible text in the image (schema v5's ``text``), the alt text
quotes it after the description (:func:`alt_text_with_text`):

  * legible text: the OCR lines joined by " / ", whitespace collapsed, kept
    only when it holds at least MIN_LEGIBLE letters or digits (a stray mark
    read as one character is not text to quote);
  * the result is ``DESCRIPTION Text: "TEXT"`` (just ``Text: "TEXT"``
    without a caption), at most ``max_chars`` characters;
  * when both do not fit, the quoted text is cut first, on a word boundary
    with "…" inside the quotes, but it keeps at least MIN_QUOTED characters:
    the description is cut (by the rules above) to leave that room.

Everything here is pure string work, so the rules are unit-tested directly.
"""

from __future__ import annotations

import re

DEFAULT_MAX_CHARS = 125
ELLIPSIS = "…"
# Text read in the image: fewer letters/digits than this is not quoted; a cut quote keeps at least MIN_QUOTED.
MIN_LEGIBLE = 2
MIN_QUOTED = 40
LINE_JOIN = " / "

# Openers that only say "this is an image"; matched case-insensitively at the
# start, repeatedly ("In this image, we can see a photo of a dog").
_OPENERS = re.compile(
    r"""^(?:
        (?:in\s+)?(?:this|the)\s+(?:image|picture|photo|photograph|illustration|scene)\s*,?\s+
            (?:shows|depicts|features|contains|captures|is\s+of|displays|presents)\s+(?:us\s+)?
      | (?:in\s+)?(?:this|the)\s+(?:image|picture|photo|photograph)\s*,\s*(?:we\s+can\s+see|there\s+is|there\s+are)?\s*
      | (?:this|it)\s+is\s+(?:an?\s+)?(?:image|picture|photo|photograph|close-up|closeup)\s+(?:of|showing)\s+
      | (?:an?\s+|the\s+)?(?:image|picture|photo|photograph|close-up\s+photo|close-up|closeup|snapshot)\s+(?:of|showing|depicting)\s+
      | we\s+can\s+see\s+
      | there\s+is\s+an?\s+(?:image|picture|photo)\s+of\s+
    )""",
    re.IGNORECASE | re.VERBOSE,
)

# A sentence ends at . ! ? (and closing quotes/brackets after them) followed by
# whitespace and a capital, digit or quote, or by the end of the text.
_SENTENCE_END = re.compile(r"""[.!?]+["')\]]*(?=\s+["'(\[]?[A-Z0-9]|\s*$)""")
# Words whose trailing "." does not end a sentence.
_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "etc", "e.g", "i.e", "no", "approx", "ft", "mt"}
# Words a cut sentence should not end on.
_DANGLING = {
    "a", "an", "the", "and", "or", "but", "with", "of", "in", "on", "at", "to", "for", "by", "from",
    "while", "as", "into", "onto", "over", "under", "near", "its", "their", "his", "her", "is", "are",
}  # fmt: skip


def first_sentence(text: str) -> str:
    """The text up to and including the end of its first sentence."""
    for match in _SENTENCE_END.finditer(text):
        before = text[: match.start()]
        last_word = before.rsplit(None, 1)[-1].lower() if before.split() else ""
        if match.group().startswith(".") and last_word.rstrip(".") in _ABBREVIATIONS:
            continue
        return text[: match.end()]
    return text


def strip_openers(text: str) -> str:
    """``text`` without leading "image of" style phrases."""
    while True:
        stripped = _OPENERS.sub("", text, count=1)
        if stripped == text or not stripped.strip():
            return text
        text = stripped.lstrip(" ,:;-")


def alt_text(caption: str | None, max_chars: int = DEFAULT_MAX_CHARS) -> str | None:
    """The alt text for ``caption``; None when there is nothing to describe."""
    if max_chars < 2:
        raise ValueError(f"max_chars must be at least 2, got {max_chars}")
    text = " ".join((caption or "").split())
    if not text:
        return None
    text = first_sentence(strip_openers(text)).strip()
    text = strip_openers(text).strip(" ,;:-")
    if not text or not any(ch.isalnum() for ch in text):
        return None
    text = text[0].upper() + text[1:]
    if len(text) <= max_chars and _ends_sentence(text):
        return text
    body = text.rstrip(" ,;:-")
    if len(body) + 1 <= max_chars and not _ends_sentence(body):
        return body + "."
    return _cut(body, max_chars)


def _ends_sentence(text: str) -> bool:
    return bool(re.search(r"""[.!?…]["')\]]*$""", text))


def _cut(text: str, max_chars: int) -> str:
    """At most ``max_chars`` characters, ending in an ellipsis, cut between words."""
    room = max_chars - len(ELLIPSIS)
    words = text[: room + 1].split(" ")
    if len(words) > 1:
        words = words[:-1] if len(" ".join(words)) > room else words
        while len(words) > 1 and words[-1].lower().strip(",;:-") in _DANGLING:
            words.pop()
        kept = " ".join(words)
    else:
        kept = text[:room]  # one word longer than the limit
    return kept.rstrip(" ,;:-.!?") + ELLIPSIS


def legible_text(text: str | None) -> str | None:
    """The OCR text as one line to quote (lines joined by " / "), or None when it is not legible text."""
    lines = [" ".join(line.split()) for line in (text or "").splitlines()]
    joined = LINE_JOIN.join(line for line in lines if line)
    return joined if sum(ch.isalnum() for ch in joined) >= MIN_LEGIBLE else None


def quoted_text(text: str, max_chars: int) -> str:
    """``Text: "TEXT"`` in at most ``max_chars`` characters, TEXT cut between words with "…" when it must be."""
    frame = 'Text: ""'
    if len(frame) + len(text) <= max_chars:
        return f'Text: "{text}"'
    return f'Text: "{_cut(text, max(2, max_chars - len(frame)))}"'


def alt_text_with_text(caption: str | None, text: str | None, max_chars: int = DEFAULT_MAX_CHARS) -> str | None:
    """The alt text for ``caption`` with the legible ``text`` read in the image quoted after it (rules above)."""
    description = alt_text(caption, max_chars)
    legible = legible_text(text)
    if legible is None:
        return description
    if description is None:
        return quoted_text(legible, max_chars)
    full = f"{description} {quoted_text(legible, max_chars)}"
    if len(full) <= max_chars:
        return full
    quote_room = max_chars - len(description) - 1
    quote_needs = min(len(quoted_text(legible, 10**9)), len('Text: ""') + MIN_QUOTED)
    if quote_room >= quote_needs:
        return f"{description} {quoted_text(legible, quote_room)}"
    description = alt_text(caption, max(2, max_chars - quote_needs - 1))
    return f"{description} {quoted_text(legible, max_chars - len(description) - 1)}"
