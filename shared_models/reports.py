"""Radiology report text: sections, sentences, a rule-based findings labeler, prompts and augmentation.

Standard library only. The vocabularies (canonical names, noun phrases, regexes) live in
:mod:`shared_models.vocabularies` and are re-exported here.

Labeling policy of :func:`extract_findings` (NegEx-style, per sentence and clause):

* A mention is *absent* when a negation cue governs it: a cue before it in the same clause ("no", "no
  evidence of", "without", "negative for", "free of", "absence of", "resolved", "resolution of", "nor",
  "not a/any", "not compatible with") or after it ("is not seen", "are absent", "has resolved", "no
  longer seen", "was excluded", "ruled out", "unlikely"). Some phrases state absence on their own
  ("heart size is normal", "the heart is not enlarged").
* A mention is *uncertain* when an uncertainty cue governs it: before ("possible", "likely", "probable",
  "questionable", "suspicious for", "may represent", "cannot exclude", "rule out", "concerning for",
  "suggestive of", "versus") or after ("cannot be excluded", "cannot be ruled out", "is not excluded",
  "is suspected", "is likely", "may be"). ``uncertain="present"`` (default, CheXpert's U-Ones, as
  CT-RATE's labels treat hedged findings) counts it present; ``"absent"`` counts it absent;
  ``"ignore"`` drops the mention.
* Scope: the nearest cue before the mention wins; a cue after the mention is used only when none
  precedes it. Scope ends at clause breaks (";", ": ", "but", "however", "although", "whereas",
  "except", "other than", "and there"), at a verb or relative pronoun between cue and mention ("No
  effusion is seen, nodules..."), and at a comma / "and" / "with" followed by a new positive noun
  phrase (an article, a size, a side or a severity word: "No effusion, small left nodule") or by a
  mention asserted after it ("No nodules, effusion is present"). A bare list keeps the scope: "No
  effusion, consolidation, or nodules (are seen)" negates all three.
* Pseudo-negations ("no change in", "no significant interval increase", "not only") are not cues.
* Conflicts: a finding stated present anywhere in the body (FINDINGS + IMPRESSION) is present, whatever
  other sentences say ("No new nodules; stable 4 mm nodule" -> present). TECHNIQUE, CLINICAL
  INFORMATION and COMPARISON are not labeled.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence

from .vocabularies import (
    BRAIN_MRI_FINDINGS, CT_RATE_FINDINGS, FINDINGS, VOCABULARIES, Finding, get_finding, get_vocabulary,
)

__all__ = [
    "BODY_SECTIONS", "BRAIN_MRI_FINDINGS", "CT_RATE_FINDINGS", "FINDINGS", "Finding", "PROMPT_STYLES",
    "SENTENCE_STYLES", "VOCABULARIES", "augment_report", "extract_findings", "finding_sentence", "findings_vector",
    "get_finding", "get_vocabulary", "opposite_sentence_pairs", "report_body", "short_sentence_report",
    "shuffle_sentences", "split_sections", "split_sentences", "structured_findings_report", "zero_shot_prompts",
]


_SECTION_ALIASES = {
    "FINDINGS": "FINDINGS", "FINDING": "FINDINGS", "IMPRESSION": "IMPRESSION", "IMPRESSIONS": "IMPRESSION",
    "CONCLUSION": "CONCLUSION", "CONCLUSIONS": "CONCLUSION", "TECHNIQUE": "TECHNIQUE",
    "CLINICAL INFORMATION": "CLINICAL INFORMATION", "CLINICAL HISTORY": "CLINICAL INFORMATION",
    "HISTORY": "CLINICAL INFORMATION", "INDICATION": "CLINICAL INFORMATION", "INDICATIONS": "CLINICAL INFORMATION",
    "COMPARISON": "COMPARISON", "COMPARISONS": "COMPARISON",
}
BODY_SECTIONS = ("FINDINGS", "IMPRESSION", "CONCLUSION")
"""Sections that make up the report body (what the models train on and the labeler reads)."""

_NAMES = "|".join(sorted((k.replace(" ", r"[ \t]+") for k in _SECTION_ALIASES), key=len, reverse=True))
# A header starts a line (colon optional when alone on its line) or follows a sentence end (colon needed).
_HEADER = re.compile(
    rf"^[ \t]*(?P<a>{_NAMES})[ \t]*(?::|(?=[ \t]*$))|(?<=[.!?])[ \t]+(?P<b>{_NAMES})[ \t]*:", re.I | re.M
)


def _sections(text: str) -> list[tuple[str | None, str, str]]:
    """(header as written or None, canonical key, body) in text order. Untitled leading text is keyed
    FINDINGS unless the report has its own FINDINGS section (then PREAMBLE)."""
    matches = list(_HEADER.finditer(text))
    if not matches:
        return [(None, "FINDINGS", text.strip())] if text.strip() else []
    keys = [_SECTION_ALIASES[re.sub(r"\s+", " ", m.group("a") or m.group("b")).upper()] for m in matches]
    out: list[tuple[str | None, str, str]] = []
    lead = text[: matches[0].start()].strip()
    if lead:
        out.append((None, "PREAMBLE" if "FINDINGS" in keys else "FINDINGS", lead))
    for i, (m, key) in enumerate(zip(matches, keys)):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        out.append((m.group().strip(), key, text[m.end() : end].strip()))
    return out


def split_sections(text: str) -> dict[str, str]:
    """Report sections by canonical upper-case header ("FINDINGS", "IMPRESSION", "CONCLUSION", "TECHNIQUE",
    "CLINICAL INFORMATION", "COMPARISON"; "PREAMBLE" for untitled text before a FINDINGS section).

    Headers are recognised case-insensitively at a line start (colon optional when the header is alone
    on its line) or after a sentence end when followed by a colon. Text without headers is
    ``{"FINDINGS": text}``; blank text is ``{}``. A repeated section is joined with a newline.
    """
    out: dict[str, str] = {}
    for _, key, body in _sections(text):
        out[key] = f"{out[key]}\n{body}" if key in out else body
    return out


def _body_sections(text: str) -> list[str]:
    sections = _sections(text)
    return [body for _, key, body in sections if key in BODY_SECTIONS and body]


def report_body(text: str) -> str:
    """FINDINGS, IMPRESSION and CONCLUSION sections in text order, one per line (the whole text when it
    has no headers); TECHNIQUE, CLINICAL INFORMATION, COMPARISON and a PREAMBLE are left out."""
    return "\n".join(_body_sections(text))


_ABBREVIATIONS = frozenset(
    {"approx.", "appr.", "e.g.", "i.e.", "vs.", "dr.", "mr.", "mrs.", "ms.", "prof.", "cf.", "fig.", "st.", "incl.",
     "resp.", "ca.", "ref."}
)
_BULLET = re.compile(r"^\s*(?:[-*\u2022\u00b7]|\d{1,2}[.)])\s+")
_END = re.compile(r"[.!?]+[\"')\]]*(?=\s)")


def _is_abbreviation(piece: str) -> bool:
    words = piece.split()
    return bool(words) and words[-1].lstrip("([\"'").lower() in _ABBREVIATIONS


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text``, stripped, none empty.

    Lines and bullets ("-", "*", "1.", "1)") are boundaries; ".", "!" and "?" followed by whitespace end a
    sentence except after an abbreviation ("approx.", "e.g.", "i.e.", "vs.", "Dr.", ...). Decimals ("3.5 mm")
    never split (no whitespace follows their point).
    """
    sentences: list[str] = []
    for line in text.splitlines():
        line = _BULLET.sub("", line, count=1)
        start = 0
        for m in _END.finditer(line):
            piece = line[start : m.end()]
            if _is_abbreviation(piece):
                continue
            sentences.append(piece.strip())
            start = m.end()
        sentences.append(line[start:].strip())
    return [s for s in sentences if s and not re.fullmatch(r"\d{1,2}[.)]", s)]


def _join_sentences(sentences: Sequence[str]) -> str:
    """Join so that :func:`split_sentences` gives the same sentences back (newline after unterminated ones)."""
    out = ""
    for i, s in enumerate(sentences):
        out += s
        if i + 1 < len(sentences):
            out += " " if s[-1] in ".!?" and not _is_abbreviation(s) else "\n"
    return out



_CLAUSE_BREAK = re.compile(
    r"[;:](?=\s|$)|\b(?:but|however|although|though|whereas|while|except(?:\s+for)?|apart\s+from|aside\s+from"
    r"|other\s+than|besides|with\s+the\s+exception\s+of)\b|\band\s+(?=there\b)",
    re.I,
)
_PSEUDO = re.compile(
    r"\b(?:no|without)\s+(?:(?:significant|interval|appreciable|substantial|further|definite|marked)\s+)*"
    r"(?:change|increase|decrease|progression|growth|regression)s?\b"
    r"|\bnot\s+(?:significantly\s+)?(?:changed|increased|decreased|progressed)\b|\bnot\s+only\b|\bno\s+doubt\b",
    re.I,
)
_PRE_UNC = (
    r"possible|possibly|probable|probably|likely|questionable|question\s+of|suspicious\s+(?:for|of)"
    r"|suspicion\s+(?:for|of)|suspected|suspect|(?:may|might|could)\s+(?:represent|reflect|indicate|be|correspond\s+to)"
    r"|(?:can|could)\s*not\s+(?:exclude|rule\s+out)|rule\s+out|r/o|concerning\s+for|suggestive\s+of|suggesting"
    r"|suggests|versus|vs\.?|differential|equivocal|borderline|presumed|presumably"
)
_PRE_NEG = (
    r"no|not\s+(?:compatible|consistent|suggestive|indicative|typical|concerning)\s+(?:with|of|for)"
    r"|not(?=\s+(?:a|an|any|evidence|definite|definitely|convincing|significant)\b)|without|negative\s+for"
    r"|free\s+of|absence\s+of|absent|nor|neither|resolved|resolution\s+of|unlikely|never|lack\s+of|rather\s+than"
)
_PRE = re.compile(rf"\b(?:(?P<unc>{_PRE_UNC})|(?P<neg>{_PRE_NEG}))(?!\w)", re.I)
_AUX = r"(?:(?:is|are|was|were|has|have|had)\s+)?(?:(?:be|been)\s+)?"
_VERBS = (
    r"(?:seen|identified|present|visualized|visualised|detected|demonstrated|evident|noted|observed|appreciated"
    r"|visible|found|apparent|shown|depicted)"
)
_POST_UNC = (
    r"(?:cannot|can\s*not|could\s*not|can't|couldn't)\s+be\s+(?:entirely\s+|completely\s+|fully\s+|definitely\s+)?"
    r"(?:excluded|ruled\s+out)|(?:(?:is|are|was|were)\s+)?not\s+(?:entirely\s+|completely\s+)?(?:excluded|ruled\s+out)"
    r"|(?:is|are|was|were)\s+(?:possible|suspected|questionable|likely|probable|considered|favou?red|uncertain"
    r"|equivocal|(?:possibly|probably|likely)\s+\w+)|(?:may|might|could)\s+(?:be|represent|reflect|exist)"
)
_POST_NEG = (
    rf"{_AUX}(?:not\s+(?:been\s+)?{_VERBS}|absent|no\s+longer(?:\s+{_VERBS})?"
    r"|(?:since\s+|completely\s+|now\s+)?resolved|disappeared|excluded|ruled\s+out|unlikely)"
)
_POST = re.compile(rf"\b(?:(?P<unc>{_POST_UNC})|(?P<neg>{_POST_NEG}))(?!\w)", re.I)
_PRE_STOP = re.compile(
    r"\b(?:is|are|was|were|has|have|had|which|who|that|there|shows?|showing|reveals?|revealing|demonstrates?)\b", re.I
)
_POST_STOP = re.compile(r"\b(?:is|are|was|were|has|have|had|which|who|that|there|shows?|reveals?)\b", re.I)
_LIST_BREAK = re.compile(r",|\band\b|\bwith\b", re.I)
_NEW_PHRASE = re.compile(
    r"\b(?:a|an|the|mild|mildly|moderate|moderately|severe|severely|small|large|minimal|minor|marked|markedly"
    r"|extensive|trace|slight|slightly|significant|prominent|new|stable|persistent|increased|decreased|known"
    r"|bilateral|left|right|multiple|several|few|scattered|focal|diffuse|patchy|subtle)\b|\d",
    re.I,
)
_ASSERTED = re.compile(
    r"\s*(?:is|are|was|were)\s+(?:(?:also|again|now|still)\s+)?"
    r"(?:present|seen|noted|identified|observed|detected|evident|visible|demonstrated)\b",
    re.I,
)
_OR_END = re.compile(r"\b(?:or|nor)\s*$", re.I)
_UNCERTAIN_POLICIES = ("present", "absent", "ignore")


def _mentions(finding: Finding, clause: str) -> list[tuple[int, int, bool]]:
    """(start, end, states_absent) for each mention of ``finding`` in ``clause``."""
    blocked = [m.span() for m in finding.blocker_regex.finditer(clause)] if finding.blocker_regex else []
    found = [
        (m.start(), m.end(), False)
        for m in finding.regex.finditer(clause)
        if not any(b0 <= m.start() and m.end() <= b1 for b0, b1 in blocked)
    ]
    if finding.absent_regex is not None:
        found += [(m.start(), m.end(), True) for m in finding.absent_regex.finditer(clause)]
    return found


def _polarity(masked: str, start: int, end: int) -> str:
    """"present", "absent" or "uncertain" for the mention ``masked[start:end]`` of one clause."""
    pre = None
    for pre in _PRE.finditer(masked, 0, start):
        pass
    if pre is not None:
        between = masked[pre.end() : start]
        later_segments = _LIST_BREAK.split(between)[1:]
        # "No nodules, effusion is present": a list break, no "or" before the mention, asserted after it.
        asserted = bool(later_segments) and _ASSERTED.match(masked, end) and not _OR_END.search(between)
        if not _PRE_STOP.search(between) and not any(_NEW_PHRASE.search(s) for s in later_segments) and not asserted:
            return "uncertain" if pre.lastgroup == "unc" else "absent"
    post = _POST.search(masked, end)
    if post is not None and not _POST_STOP.search(masked[end : post.start()]):
        return "uncertain" if post.lastgroup == "unc" else "absent"
    return "present"


def extract_findings(
    text: str, vocabulary: str | Sequence[str] | None = None, *, uncertain: str = "present"
) -> dict[str, bool]:
    """The findings a report mentions: True = present, False = stated absent; unmentioned ones are left out.

    Reads the report body (:func:`report_body`) sentence by sentence and clause by clause; see the module
    docstring for the negation, uncertainty and conflict rules.

    Args:
        text: the report.
        vocabulary: see :func:`get_vocabulary`.
        uncertain: ``"present"`` (default), ``"absent"`` or ``"ignore"`` for hedged mentions.

    Returns:
        A dict in vocabulary order.
    """
    if uncertain not in _UNCERTAIN_POLICIES:
        raise ValueError(f"Unknown uncertain policy {uncertain!r}; choose one of {list(_UNCERTAIN_POLICIES)}.")
    names = get_vocabulary(vocabulary)
    votes: dict[str, set[bool]] = {}
    for sentence in split_sentences(report_body(text)):
        for clause in _CLAUSE_BREAK.split(sentence):
            masked = _PSEUDO.sub(lambda m: " " * len(m.group()), clause)
            for name in names:
                for start, end, states_absent in _mentions(FINDINGS[name], clause):
                    polarity = "absent" if states_absent else _polarity(masked, start, end)
                    if polarity == "uncertain":
                        if uncertain == "ignore":
                            continue
                        polarity = uncertain
                    votes.setdefault(name, set()).add(polarity == "present")
    return {name: any(votes[name]) for name in names if name in votes}


def findings_vector(
    findings: Mapping[str, bool], vocabulary: str | Sequence[str] | None = None, *, unmentioned: str = "absent"
) -> tuple[list[float], list[float]]:
    """(labels, mask) in vocabulary order: label 1.0 where present, else 0.0.

    ``unmentioned="absent"`` (default, like CT-RATE's binary labels) gives mask 1.0 everywhere;
    ``"ignore"`` gives mask 0.0 for findings not in ``findings``. Keys outside the vocabulary are ignored.
    """
    if unmentioned not in ("absent", "ignore"):
        raise ValueError(f"Unknown unmentioned policy {unmentioned!r}; choose 'absent' or 'ignore'.")
    names = get_vocabulary(vocabulary)
    labels = [1.0 if findings.get(name) else 0.0 for name in names]
    mask = [1.0 if unmentioned == "absent" or name in findings else 0.0 for name in names]
    return labels, mask



PROMPT_STYLES: dict[str, tuple[str, str]] = {
    "ct_clip": ("{X} is present.", "{X} is not present."),
    "plain": ("{x}.", "not {x}."),
    "there_is": ("There is {x}.", "There is no {x}."),
    "compatible": ("Findings are compatible with {x}.", "Findings are not compatible with {x}."),
    "colipri_short": ("{X} present", "No {x} present"),
}
"""Zero-shot prompt pairs (positive, negative). ``{X}`` is the canonical name (``colipri_short``: the
capitalised noun phrase, "Lung nodules present"), ``{x}`` the lowercase noun phrase."""

SENTENCE_STYLES: dict[str, tuple[str, str]] = {
    "plain": ("{X} is present.", "No {x}."),
    **{k: v for k, v in PROMPT_STYLES.items() if k != "plain"},
}
"""Report-sentence pairs for :func:`finding_sentence`: ``"plain"`` is the report style, the others are the
prompt styles of the same name (the bare ``PROMPT_STYLES["plain"]`` phrase is not a sentence)."""

_PHRASE_X_STYLES = frozenset({"colipri_short"})


def _fill(template: str, finding: Finding, style: str) -> str:
    big = finding.phrase[:1].upper() + finding.phrase[1:] if style in _PHRASE_X_STYLES else finding.name
    sentence = template.format(X=big, x=finding.phrase)
    return sentence.replace("There is ", "There are ") if finding.plural else sentence


def _style(styles: Mapping[str, tuple[str, str]], style: str) -> tuple[str, str]:
    if style not in styles:
        raise ValueError(f"Unknown style {style!r}; known styles: {list(styles)}.")
    return styles[style]


def zero_shot_prompts(name: str, style: str = "ct_clip") -> tuple[str, str]:
    """(positive, negative) zero-shot prompts for one finding, e.g. ("Cardiomegaly is present.",
    "Cardiomegaly is not present."). Raises ValueError for an unknown style or finding."""
    positive, negative = _style(PROMPT_STYLES, style)
    finding = get_finding(name)
    return _fill(positive, finding, style), _fill(negative, finding, style)


def finding_sentence(name: str, present: bool, style: str = "plain") -> str:
    """A sentence stating one finding present or absent: ("Pleural effusion", True) -> "Pleural effusion is
    present.", False -> "No pleural effusion." (style ``"plain"``; see :data:`SENTENCE_STYLES`)."""
    positive, negative = _style(SENTENCE_STYLES, style)
    return _fill(positive if present else negative, get_finding(name), style)


def _pick_styles(rng: random.Random | None, styles: Sequence[str] | None) -> list[str]:
    chosen = list(styles) if styles is not None else (list(SENTENCE_STYLES) if rng is not None else ["plain"])
    if not chosen:
        raise ValueError("styles must not be empty.")
    for style in chosen:
        _style(SENTENCE_STYLES, style)
    return chosen


def opposite_sentence_pairs(
    findings: Mapping[str, bool], rng: random.Random | None = None, styles: Sequence[str] | None = None
) -> list[tuple[str, str]]:
    """(true sentence, opposite sentence) per mentioned finding, in ``findings`` order (COLIPRI's Opposite
    Sentence Loss). Without ``rng`` every pair uses ``styles[0]`` (default ``"plain"``); with ``rng`` each
    pair's style is drawn from ``styles`` (default: all of :data:`SENTENCE_STYLES`), deterministically for
    a seeded rng."""
    chosen = _pick_styles(rng, styles)
    pairs = []
    for name, present in findings.items():
        style = rng.choice(chosen) if rng is not None else chosen[0]
        pairs.append((finding_sentence(name, bool(present), style), finding_sentence(name, not present, style)))
    return pairs




NO_FINDINGS_SENTENCE = "No abnormal findings."


def structured_findings_report(findings: Mapping[str, bool], vocabulary: str | Sequence[str] = "ct_rate") -> str:
    """The findings of a study as a short structured report: one sentence per present finding, in
    vocabulary order ("Cardiomegaly is present. Pleural effusion is present."), or
    :data:`NO_FINDINGS_SENTENCE` when none is. What the report decoder learns by default: COLIPRI
    structures reports before training the decoder, so that it learns the findings rather than the
    boilerplate every report shares. The labeler reads each sentence back as its finding."""
    present = [name for name in get_vocabulary(vocabulary) if findings.get(name) is True]
    if not present:
        return NO_FINDINGS_SENTENCE
    return " ".join(finding_sentence(name, True) for name in present)


def shuffle_sentences(text: str, rng: random.Random) -> str:
    """Shuffle the sentences inside each section; section order and headers are kept. Sections are
    rejoined one per line, sentences with a space (a newline after an unterminated sentence)."""
    parts = []
    for header, _, body in _sections(text):
        sentences = split_sentences(body)
        rng.shuffle(sentences)
        joined = _join_sentences(sentences)
        if header is None:
            parts.append(joined)
        elif not joined:
            parts.append(header)
        else:
            parts.append(f"{header} {joined}" if header.endswith(":") else f"{header}\n{joined}")
    return "\n".join(parts)


def short_sentence_report(
    findings: Mapping[str, bool],
    rng: random.Random,
    max_sentences: int | None = None,
    styles: Sequence[str] | None = None,
) -> str:
    """A short report of one short sentence per finding, in random order and random phrasing styles
    (COLIPRI's short-sentence augmentation, closing the gap between long reports and short prompts).
    ``max_sentences`` keeps a random subset of at most that many findings. Empty findings give ""."""
    if max_sentences is not None and max_sentences < 0:
        raise ValueError(f"max_sentences must be >= 0 or None, got {max_sentences}.")
    chosen = _pick_styles(rng, styles)
    items = list(findings.items())
    rng.shuffle(items)
    if max_sentences is not None:
        items = items[:max_sentences]
    sentences = [finding_sentence(name, bool(present), rng.choice(chosen)) for name, present in items]
    return " ".join(s if s.endswith(".") else s + "." for s in sentences)


def augment_report(
    text: str, findings: Mapping[str, bool], rng: random.Random, shuffle_p: float = 0.5, short_p: float = 0.2
) -> str:
    """COLIPRI report augmentation: with probability ``short_p`` a :func:`short_sentence_report` (when
    ``findings`` is non-empty), else with probability ``shuffle_p`` the report body with its sentences
    shuffled within each section, else :func:`report_body`."""
    for label, p in (("shuffle_p", shuffle_p), ("short_p", short_p)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{label} must be in [0, 1], got {p}.")
    if rng.random() < short_p and findings:
        return short_sentence_report(findings, rng)
    sections = _body_sections(text)
    if rng.random() < shuffle_p:
        return "\n".join(shuffle_sentences(s, rng) for s in sections)
    return "\n".join(sections)
