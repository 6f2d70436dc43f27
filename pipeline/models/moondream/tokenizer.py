"""The starmie-v1 tokenizer, used through the ``tokenizers`` library as the reference uses it.

The reference loads ``moondream/starmie-v1``'s tokenizer.json (not the legacy
tokenizer files inside vikhyatk/moondream2), encodes a question with
``encode(question).ids`` and decodes generated ids with ``decode(ids)``. Its
streaming decoder restarts after every newline, so the final text is the
concatenation of the decoded newline-terminated segments; ``decode`` does the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

# Single-token spellings counted as "yes"/"no" for a probe's yes-probability.
YES_WORDS = ("Yes", "yes", " Yes", " yes", "YES")
NO_WORDS = ("No", "no", " No", " no", "NO")


class NotStarmieTokenizer(ValueError):
    pass


def is_starmie(tokenizer) -> bool:
    """starmie-v1 has <|endoftext|> at 0 and <|md_reserved_0..2|> at 1..3; the legacy moondream2
    tokenizer.json does not."""
    return tokenizer.token_to_id("<|endoftext|>") == 0 and all(
        tokenizer.token_to_id(f"<|md_reserved_{i}|>") == i + 1 for i in range(3)
    )


class MoondreamTokenizer:
    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer

        self.path = Path(path)
        self._tok = Tokenizer.from_file(str(self.path))
        if not is_starmie(self._tok):
            raise NotStarmieTokenizer(
                f"{self.path} is not the moondream/starmie-v1 tokenizer (its special tokens differ); "
                "the tokenizer.json inside vikhyatk/moondream2 is a stale legacy file the model does not use"
            )
        self._newline_ids: dict[int, bool] = {}

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        parts, start = [], 0
        for i, token in enumerate(ids):
            # Cheap filter first: only a token that itself decodes with a newline can end a segment.
            if token not in self._newline_ids:
                self._newline_ids[token] = "\n" in self._tok.decode([token])
            if self._newline_ids[token]:
                segment = self._tok.decode(list(ids[start : i + 1]))
                if segment.endswith("\n"):
                    parts.append(segment)
                    start = i + 1
        if start < len(ids):
            parts.append(self._tok.decode(list(ids[start:])))
        return "".join(parts)

    def single_token_ids(self, words: Iterable[str]) -> tuple[int, ...]:
        """Ids of the words that encode to exactly one token (each id once)."""
        found = []
        for word in words:
            ids = self.encode(word)
            if len(ids) == 1 and ids[0] not in found:
                found.append(ids[0])
        return tuple(found)
