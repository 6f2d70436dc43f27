"""Probe sets: the fixed questions asked of every image."""

from __future__ import annotations

import hashlib
import json
import re
from importlib import resources
from pathlib import Path

import yaml

MAX_PROBES = 64
MAX_QUESTION_CHARS = 500

_YES_NO_OPENERS = re.compile(
    r"^(is|are|was|were|am|does|do|did|can|could|has|have|had|will|would|should|shall|may|might|must)\b",
    re.IGNORECASE,
)
_YES = re.compile(r"^\W*(yes|yeah|yep|true)\b", re.IGNORECASE)
_NO = re.compile(r"^\W*(no|nope|false|not)\b", re.IGNORECASE)


class ProbeFileError(ValueError):
    pass


def default_probes() -> tuple[str, ...]:
    text = resources.files("pipeline").joinpath("default_probes.yaml").read_text()
    return validate_questions(yaml.safe_load(text), "the default probe set")


def load_probes(path: str | Path) -> tuple[str, ...]:
    """Read a YAML or JSON list of questions (or ``{"probes": [...]}``)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ProbeFileError(f"cannot read probe file {path}: {exc.strerror or exc}") from exc
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise ProbeFileError(f"probe file {path} is not valid {path.suffix.lstrip('.') or 'YAML'}: {exc}") from exc
    return validate_questions(data, f"probe file {path}")


def validate_questions(data, where: str) -> tuple[str, ...]:
    """The one check every probe set passes, from a file, a config tree or the defaults."""
    if isinstance(data, dict) and "probes" in data:
        data = data["probes"]
    if data is None:
        data = []
    if not isinstance(data, list):
        raise ProbeFileError(f"{where} must be a list of questions, got {type(data).__name__}")
    questions = []
    for i, item in enumerate(data):
        if not isinstance(item, str) or not item.strip():
            raise ProbeFileError(f"{where}: item {i + 1} must be a non-empty string, got {item!r}")
        question = " ".join(item.split())
        if len(question) > MAX_QUESTION_CHARS:
            raise ProbeFileError(f"{where}: item {i + 1} is longer than {MAX_QUESTION_CHARS} characters")
        questions.append(question)
    if len(set(questions)) != len(questions):
        dupes = sorted({q for q in questions if questions.count(q) > 1})
        raise ProbeFileError(f"{where}: duplicate questions {dupes}")
    if len(questions) > MAX_PROBES:
        raise ProbeFileError(f"{where}: {len(questions)} questions, at most {MAX_PROBES} allowed")
    return tuple(questions)


def probe_set_hash(questions: tuple[str, ...]) -> str:
    return hashlib.sha256(json.dumps(list(questions)).encode()).hexdigest()


def is_yes_no_question(question: str) -> bool:
    return bool(_YES_NO_OPENERS.match(question.strip()))


def answer_as_bool(question: str, answer: str | None) -> bool | None:
    """True/False for a yes/no question answered yes or no; None otherwise."""
    if answer is None or not is_yes_no_question(question):
        return None
    if _YES.match(answer):
        return True
    if _NO.match(answer):
        return False
    return None
