"""Row filters shared by every search mode: ``--where`` and ``--probe``.

``--where`` is, by design, a SQL boolean expression written by the user over
the columns of the ``images`` view (e.g. ``width >= 1024 AND format = 'PNG'``,
``probe_bool(probes, 'Is there a person?')``). It is accepted only when

  * it contains no ';' (no statement separators, not even inside literals),
  * DuckDB's parser reads it as exactly one expression, and
  * the original text, wrapped as ``SELECT 1 WHERE (<expr>)``, parses as
    exactly one SELECT statement (this catches text the expression parser
    silently ignores, such as a trailing ``FROM x``).

What reaches the query is the expression as DuckDB's parser re-rendered it
(comments dropped), inside parentheses, as a subquery filter on ``images``.
It also runs only on a read-only connection with file access disabled (see
ImageIndex.open), so the worst a hostile expression can do is read the index.

``--probe`` never becomes SQL text: the question and the answer or threshold
are bound parameters, and the comparison operator is picked from a fixed table.
Two forms:

  "Question?=answer"   the answer matches (yes/no compare ``answer_bool``)
  "Question?>0.8"      the model's probability of "yes" (``yes_prob``, schema
                       v2) compares with the threshold; also >=, < and <=.
                       Rows without a yes_prob (v1 files, questions that are
                       not yes/no) never pass a threshold.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import duckdb

from pipeline.search.contract import IMAGES, STORED_IMAGES
from pipeline.search.errors import SearchError

_YES = {"yes", "true", "y"}
_NO = {"no", "false", "n"}
# Threshold operators on yes_prob: what the user types -> the SQL operator.
_THRESHOLDS = {">": ">", ">=": ">=", "<": "<", "<=": "<="}
_FORMS = '"Is there a person?=yes" (QUESTION=ANSWER) or "Is there a person?>0.8" (QUESTION>P, also >=, <, <=)'


@dataclass(frozen=True)
class ProbeFilter:
    """Rows whose answer to ``question`` is ``answer`` (yes/no compare answer_bool),
    or, with a threshold operator, whose ``yes_prob`` compares with ``answer`` as a number."""

    question: str
    answer: str
    operator: str = "="

    @classmethod
    def parse(cls, text: str) -> "ProbeFilter":
        # Split at the last '=', '<' or '>': questions end with '?', answers are short.
        at = max(text.rfind(c) for c in "=<>")
        if at < 0:
            raise SearchError(f"--probe {text!r} must look like {_FORMS}")
        start = at - 1 if text[at] == "=" and at > 0 and text[at - 1] in "<>" else at
        operator = text[start : at + 1]
        question, answer = " ".join(text[:start].split()), text[at + 1 :].strip()
        if not question or not answer:
            raise SearchError(f"--probe {text!r} must look like {_FORMS}")
        if operator in _THRESHOLDS:
            try:
                threshold = float(answer)
            except ValueError:
                threshold = float("nan")
            if not 0.0 <= threshold <= 1.0:
                raise SearchError(
                    f"--probe {text!r}: {answer!r} is not a probability; after {operator} give a number "
                    f"from 0 to 1, e.g. \"{question}{operator}0.8\""
                )
        return cls(question, answer, operator)

    @property
    def as_bool(self) -> bool | None:
        word = self.answer.lower()
        return True if word in _YES else False if word in _NO else None

    def spec(self) -> dict:
        """This filter as one row of the bound filter table that filter_sql joins the probe answers with."""
        row = {"question": self.question.lower(), "kind": "text", "text": None, "flag": None, "number": None}
        if self.operator in _THRESHOLDS:
            row.update(kind=self.operator, number=float(self.answer))
        elif self.as_bool is not None:
            row.update(kind="bool", flag=self.as_bool)
        else:
            row.update(text=self.answer.lower())
        return row


# The filter table's type, and what each kind of filter asks of one probe answer ``a.p``.
# NULL yes_prob (v1 rows, open questions) compares to NULL: excluded by a threshold.
_SPEC_TYPE = "STRUCT(n INTEGER, question VARCHAR, kind VARCHAR, text VARCHAR, flag BOOLEAN, number DOUBLE)[]"
_MATCH = (
    "CASE f.kind WHEN 'bool' THEN a.p.answer_bool = f.flag WHEN 'text' THEN lower(trim(a.p.answer)) = f.text "
    + " ".join(f"WHEN '{op}' THEN a.p.yes_prob {sql_op} f.number" for op, sql_op in _THRESHOLDS.items())
    + " END"
)


# Up to this many distinct probe filters are list predicates; more are one join (issue 14).
_LAMBDA_SPECS = 8
_LAMBDA_MATCH = {
    "bool": "p.answer_bool = ?", "text": "lower(trim(p.answer)) = ?",
    **{op: f"p.yes_prob {sql_op} ?" for op, sql_op in _THRESHOLDS.items()},
}
_LAMBDA_VALUE = {"bool": "flag", "text": "text", **{op: "number" for op in _THRESHOLDS}}


def filter_ids_sql(where: str | None, probes, known_questions) -> tuple[str, list] | None:
    """A query for the ids of the rows that pass every filter (None when there is no filter).

    What the vector scan reads (pipeline.search.scan): the ids straight from
    the view, not ``id IN (...)`` around it, which costs a semi-join over every row.
    """
    probe = _probe_part(probes, known_questions)
    if where is None:
        return (probe[0], probe[1]) if probe else None
    view, expression = _where_part(where)
    sql = f"SELECT id FROM {view} WHERE (\n{expression}\n)"
    return (f"{sql} AND id IN ({probe[0]})", probe[1]) if probe else (sql, [])


def _where_part(where: str) -> tuple[str, str]:
    """(the view to read, the checked expression) of a --where.

    The reader's TEMP ``images`` view joins every row with the vector file for
    its embedding; an expression that does not name the embedding reads the
    stored view instead (the same columns, embedding null): 20 ms against 130 ms
    at 100k rows.
    """
    expression = validate_where(where)
    view = IMAGES if re.search("embedding", expression, re.IGNORECASE) else STORED_IMAGES
    return view, expression


def _probe_part(probes, known_questions) -> tuple[str, list] | None:
    """(a query for the ids passing every --probe, its parameters), None without probe filters."""
    specs = _probe_specs(probes, known_questions)
    if not specs:
        return None
    if len(specs) <= _LAMBDA_SPECS:
        # A few filters: one list predicate each on the row's own answers, no unnest or GROUP BY
        # (bench/search.py, 100k rows: 30-40 ms against 100-160 ms for the join below).
        predicates, params = [], []
        for spec in specs:
            predicate, value = _LAMBDA_MATCH[spec["kind"]], spec[_LAMBDA_VALUE[spec["kind"]]]
            predicates.append(f"len(list_filter(probes, p -> lower(p.question) = ? AND {predicate})) > 0")
            params += [spec["question"], value]
        return f"SELECT id FROM image_rows WHERE {' AND '.join(predicates)}", params
    return _joined_probe_ids(specs)


def _joined_probe_ids(specs: list[dict]) -> tuple[str, list]:
    """(a query for the ids passing every filter of ``specs``, its parameters), as one join.

    Every probe filter in one bound table, joined once with the unnested
    answers: a row passes when each filter matched one of its answers.
    Linear in rows x answers; a subquery per filter made DuckDB plan N
    joins, at a cost growing much faster than N (issue 14).
    """
    sql = (
        "SELECT a.id FROM (SELECT id, unnest(probes) AS p FROM image_rows) AS a "
        f"JOIN (SELECT unnest(?::{_SPEC_TYPE}, recursive := true)) AS f "
        f"ON lower(a.p.question) = f.question AND ({_MATCH}) "
        "GROUP BY a.id HAVING count(DISTINCT f.n) = ?"
    )
    return sql, [[{"n": n, **spec} for n, spec in enumerate(specs)], len(specs)]


def validate_where(expression: str) -> str:
    """The user's boolean expression, checked and re-rendered by DuckDB's parser."""
    text = expression.strip()
    if not text:
        raise SearchError("--where is empty; give a SQL boolean expression such as \"width > 512\"")
    if ";" in text:
        raise SearchError("--where must be a single SQL expression; ';' is not allowed (use chr(59) inside a string)")
    try:
        rendered = str(duckdb.SQLExpression(text))
        parser = duckdb.connect(":memory:")
        try:
            statements = parser.extract_statements(f"SELECT 1 WHERE (\n{text}\n)")
        finally:
            parser.close()
    except duckdb.Error as exc:
        raise SearchError(f"--where {expression!r} is not a SQL expression: {_first_line(exc)}") from exc
    if len(statements) != 1 or statements[0].type != duckdb.StatementType.SELECT:
        raise SearchError(f"--where {expression!r} must be one boolean expression, not a statement")
    return rendered


def filter_sql(where: str | None, probes, known_questions) -> tuple[str, list]:
    """A SQL condition on ``id`` (and its parameters) combining every filter; 'TRUE' when none.

    The ids come from the same query the vector scan reads (:func:`filter_ids_sql`): a few probe
    filters as list predicates, --where over the stored view. bench/serve.py (100k rows): the page's
    hybrid with a probe filter went from 875 ms with the join form to about the unfiltered time.
    """
    query = filter_ids_sql(where, probes, known_questions)
    if query is None:
        return "TRUE", []
    return f"id IN ({query[0]})", list(query[1])


def _probe_specs(probes, known_questions) -> list[dict]:
    """The distinct probe filters as bound-table rows, each checked against the index's questions."""
    known = {q.lower(): q for q in known_questions}
    specs = []
    for probe in probes or ():
        if isinstance(probe, str):
            probe = ProbeFilter.parse(probe)
        if probe.question.lower() not in known:
            listed = "; ".join(known.values()) or "none (the files were captioned without probes)"
            raise SearchError(f"--probe: no question {probe.question!r} in this index. Its questions: {listed}")
        spec = probe.spec()
        if spec not in specs:  # a repeated filter adds nothing
            specs.append(spec)
    return specs


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0]
