"""Caption text for training sets (txt, imagefolder, hf-dataset): a trigger word and a style.

kohya-ss, OneTrainer and similar trainers read one caption per image, often
led by a trigger word (``sks``, a LoRA's token) and often written as
comma-separated tags rather than a sentence.

  * ``sentence``: the caption as the model wrote it (whitespace-normalised).
  * ``tags``: a tag for every yes/no probe the model answered yes
    (:func:`question_tag`: "Is there a person in the image?" -> "person"),
    then the caption cut into phrases at sentence and clause ends, lower
    case, without "the image shows"-style openers (pipeline.export.alt_text);
    duplicates dropped, joined with ", ".

``--trigger WORD`` comes first in either style (``sks, person, a dog ...`` /
``sks a dog ...``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pipeline.export.alt_text import strip_openers
from pipeline.export.rows import ExportRow
from pipeline.probes import is_yes_no_question

STYLES = ("sentence", "tags")

_OPENER = re.compile(
    r"^(?:is|are|was|were|does|do|did|can|could|has|have|had|will|would|should)\s+"
    r"(?:there\s+(?:an?\s+|any\s+|some\s+)?|(?:the|this)\s+(?:image|photo|picture)\s+(?:show|contain|have|depict|include)s?\s+"
    r"(?:an?\s+|any\s+|some\s+)?|(?:the|this)\s+(?:image|photo|picture)\s+|(?:it|this)\s+(?:an?\s+)?|(?:an?|the|any)\s+)?",
    re.IGNORECASE,
)
_WHERE = re.compile(r"\s+(?:in|on)\s+(?:the|this)\s+(?:image|photo|picture|scene)$", re.IGNORECASE)
_SENTENCE_END = re.compile(r"[.;!?]+(?:\s+|$)")
_CLAUSE_END = re.compile(r",\s*")


def question_tag(question: str) -> str:
    """The thing a yes/no question asks about: its opener and "in the image" removed, lower case."""
    text = " ".join(question.strip().rstrip("?").split())
    text = _WHERE.sub("", _OPENER.sub("", text, count=1))
    return text.lower().strip() or question.lower().rstrip("?")


def caption_tags(caption: str) -> list[str]:
    phrases = []
    for sentence in _SENTENCE_END.split(" ".join(caption.replace('"', "").split())):
        for part in _CLAUSE_END.split(strip_openers(sentence.strip())):
            phrase = part.strip(" '").lower()
            if phrase:
                phrases.append(phrase)
    return phrases


@dataclass(frozen=True)
class TrainingText:
    trigger: str | None = None
    style: str = "sentence"

    def __post_init__(self):
        if self.style not in STYLES:
            raise ValueError(f"unknown caption style {self.style!r}; use one of {', '.join(STYLES)}")

    @property
    def plain(self) -> bool:
        """True when the text is the caption alone (no trigger, sentence style): datasets then add no text column."""
        return not self.trigger and self.style == "sentence"

    def of(self, row: ExportRow) -> str | None:
        """The training caption of ``row``; None when it has nothing to say (no caption, no yes answer)."""
        trigger = " ".join((self.trigger or "").split())
        if self.style == "sentence":
            if not (row.caption and row.caption.strip()):
                return None
            caption = " ".join(row.caption.split())
            return f"{trigger} {caption}" if trigger else caption
        tags = [question_tag(p.question) for p in row.probes if p.answer_bool and is_yes_no_question(p.question)]
        tags += caption_tags(row.caption or "")
        tags = list(dict.fromkeys(t for t in tags if t))
        if not tags:
            return None
        return ", ".join([trigger, *tags] if trigger else tags)
