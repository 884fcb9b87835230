"""Sentence splitting for speech: a whole text at once (`split_sentences`) or text arriving in
pieces, e.g. tokens from an LLM (`SentenceBuffer`).

A sentence ends at `.`, `!`, `?` or `…` (repeats such as `?!` or `...` stay together, closing
quotes and brackets go with it) followed by white space, or at a blank line. Not an end: a
period after a known abbreviation (Mr., e.g., etc.), after a single letter (initials: J. R.
Smith), or inside a number (3.14, 1,000.5: no space follows). A sentence longer than
`max_chars` is cut at its last clause mark (, ; :) or space before the limit, so one long
sentence does not hold back the first audio.

Invariants: the sentences of a text, joined with single spaces, hold every non-space character
of the text in order (nothing dropped, nothing invented); SentenceBuffer fed a text in any
pieces yields exactly split_sentences(text) once ended, when no sentence is over `max_chars` and
no word is cut right after a period (a piece ending "example." then "com" is two sentences).
"""

from __future__ import annotations

import re

MAX_SENTENCE_CHARS = 300

ABBREVIATIONS = frozenset("""
mr mrs ms dr prof sr jr st mt ft vs etc eg ie e.g i.e cf al approx dept est fig figs inc ltd co corp
no nos vol vols pp jan feb mar apr jun jul aug sep sept oct nov dec mon tue wed thu fri sat sun
a.m p.m u.s u.k gen col lt sgt capt rev hon gov sen rep
""".split())

_END = re.compile(r"[.!?…]+[\"'”’)\]]*(?=\s)|\n\s*\n")
_WORD_BEFORE = re.compile(r"([A-Za-z][A-Za-z.]*)\.$")


def _is_abbreviation(text: str, dot: int) -> bool:
    """Whether the '.' at index `dot` of `text` ends an abbreviation or an initial, not a sentence."""
    m = _WORD_BEFORE.search(text, 0, dot + 1)
    if m is None:
        return False
    word = m.group(1)
    if len(word) == 1 and word.isupper():   # an initial: "J. Smith"
        return True
    return word.lower().rstrip(".") in ABBREVIATIONS


def _boundaries(text: str) -> list[int]:
    """Indexes just past each sentence end found in `text` (a sentence end needs the space after it)."""
    cuts = []
    for m in _END.finditer(text):
        mark = m.group(0)
        if mark.startswith(".") and mark.rstrip("\"'”’)]") == "." and _is_abbreviation(text, m.start()):
            continue
        cuts.append(m.end())
    return cuts


_TAIL_END = re.compile(r"(?:^|[\s\"'(“‘])([A-Za-z][a-z]+|[A-Za-z]{2,})([.!?…]+)[\"'”’)\]]*$")


def _ends_now(tail: str) -> bool:
    """Whether text ending in `tail` has surely ended a sentence, though nothing follows yet: a
    `!`/`?`/`…` or a period after a word of two or more letters that is not an abbreviation (a
    period after a number or a single letter may go on: 3.14, e.g.), outside open quotes and
    brackets (their closing mark goes with the sentence)."""
    m = _TAIL_END.search(tail)
    if m is None or tail.count('"') % 2 or tail.count("“") > tail.count("”") or tail.count("(") > tail.count(")"):
        return False   # inside quotes or brackets: the closing mark may follow
    return not (m.group(2) == "." and m.group(1).lower() in ABBREVIATIONS)


def _cut_long(sentence: str, max_chars: int) -> list[str]:
    """`sentence` in pieces of at most `max_chars` characters, cut at clause marks or spaces."""
    out = []
    while len(sentence) > max_chars:
        window = sentence[:max_chars]
        cut = max(window.rfind(", "), window.rfind("; "), window.rfind(": "))
        cut = cut + 1 if cut > max_chars // 3 else window.rfind(" ")
        if cut <= 0:
            cut = max_chars
        out.append(sentence[:cut].strip())
        sentence = sentence[cut:].strip()
    if sentence:
        out.append(sentence)
    return out


def _pieces(text: str, cuts: list[int], max_chars: int) -> list[str]:
    out, start = [], 0
    for cut in [*cuts, len(text)]:
        chunk = " ".join(text[start:cut].split())
        if chunk:
            out.extend(_cut_long(chunk, max_chars))
        start = cut
    return out


def split_sentences(text: str, max_chars: int = MAX_SENTENCE_CHARS) -> list[str]:
    """The sentences of `text`, white space inside each collapsed to single spaces."""
    return _pieces(text, _boundaries(text), max_chars)


class SentenceBuffer:
    """Text arriving in pieces -> sentences as soon as each is complete.

    `feed` returns the sentences its text completed: a sentence is complete once white space
    follows its end mark, or at once when its end is unambiguous (`_ends_now`: "Sure thing." is
    spoken without waiting for the next token; "3." waits for one). `end` returns what is left.
    Holds only the unfinished tail.
    """

    def __init__(self, max_chars: int = MAX_SENTENCE_CHARS):
        self.max_chars = max_chars
        self._tail = ""
        self.characters = 0   # characters fed so far

    def feed(self, text: str) -> list[str]:
        self.characters += len(text)
        self._tail += text
        cuts = _boundaries(self._tail)
        done: list[str] = []
        if cuts:
            done = _pieces(self._tail[:cuts[-1]], cuts[:-1], self.max_chars)
            self._tail = self._tail[cuts[-1]:]
        if _ends_now(self._tail):                     # "...thing." : speak now, not a token later
            done += split_sentences(self._tail, self.max_chars)
            self._tail = ""
        if len(self._tail) > self.max_chars:          # a long run without an end mark
            *full, rest = _cut_long(" ".join(self._tail.split()), self.max_chars)
            done += full
            self._tail = rest + (" " if self._tail[-1].isspace() else "")
        return done

    def flush(self) -> list[str]:
        """Everything held, as sentences, even if its last sentence has no end mark yet."""
        out = split_sentences(self._tail, self.max_chars)
        self._tail = ""
        return out

    end = flush

    @property
    def pending(self) -> str:
        return self._tail
