"""What a class is, in codes: the segmented property category and type of a DICOM-SEG segment.

A model learns what its training SEGs' segments are, so the SEGs it predicts carry their codes, not
a guess from the class name ("bone" is no organ). Only concepts of pydicom's code dictionary travel:
a site releases (scheme designator, code value) pairs, and every reader takes the meaning from the
dictionary, never from a file or a message (free text in a hospital's file could carry anything).

A class's coding travels as a `Pair`; a checkpoint and history.json store it with its meanings
(`stored`), and a model reads it back as pydicom Codes (`from_stored`).
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pydicom.sr.codedict import CONCEPTS, codes
from pydicom.sr.coding import Code

if TYPE_CHECKING:
    import highdicom as hd

Pair = tuple[str, str, str, str]  # (category scheme, category value, type scheme, type value)
Coding = tuple[Code, Code]  # (segmented property category, segmented property type), meanings from the dictionary
# A class whose training SEGs gave no dictionary codes (NIfTI labels, older runs): says nothing it does not know.
GENERIC: Coding = (codes.SCT.AnatomicalStructure, codes.SCT.AnatomicalStructure)
MAX_TEXT = 64  # a scheme designator or code value (DICOM SH/UC): anything longer is not a code


@functools.cache
def _scheme(scheme: str) -> dict[str, Code]:
    """Code value → the dictionary's concept. A value listed under several names (SCT 85756007 is both
    "Body tissue structure (body structure)" and "Tissue") takes the meaning in most of DICOM's
    context groups, the first listed on a tie."""
    best: dict[str, tuple[str, int]] = {}
    for entries in CONCEPTS[scheme].values():
        for value, (meaning, groups) in entries.items():
            if value not in best or len(groups) > best[value][1]:
                best[value] = (meaning, len(groups))
    return {value: Code(value, scheme, meaning) for value, (meaning, _) in best.items()}


def concept(scheme: Any, value: Any) -> Code | None:
    """The dictionary's concept for (scheme, value), with its meaning; None for anything else."""
    if not (isinstance(scheme, str) and isinstance(value, str) and len(value) <= MAX_TEXT and scheme in CONCEPTS):
        return None
    return _scheme(scheme).get(value)


def coding(pair: Any) -> Coding | None:
    """A released pair as Codes, both in the dictionary; None when it is not four such strings."""
    if not isinstance(pair, Sequence) or isinstance(pair, str) or len(pair) != 4:
        return None
    category, kind = concept(pair[0], pair[1]), concept(pair[2], pair[3])
    return (category, kind) if category and kind else None


def pair_of(description: hd.seg.SegmentDescription) -> Pair:
    """A segment's coding as its file writes it (not yet checked against the dictionary); each text cut
    just past MAX_TEXT, so a hostile file's megabyte "code" costs nothing and still matches no concept."""
    category, kind = description.segmented_property_category, description.segmented_property_type
    texts = (category.scheme_designator, category.value, kind.scheme_designator, kind.value)
    return tuple(str(t)[:MAX_TEXT + 1] for t in texts)  # type: ignore[return-value]


def most_common(counts: Counter[Pair]) -> Pair:
    """The pair counted most; a tie goes to the smallest pair, so the answer never depends on order."""
    return min(counts, key=lambda p: (-counts[p], p))


def releasable(counts: Mapping[str, Counter[Pair]]) -> tuple[dict[str, Pair], dict[str, Pair]]:
    """A site's release: per class the pair most of its SEGs use, where the dictionary knows it; and
    the classes whose pair it does not know, with that pair (they release nothing)."""
    chosen = {name: most_common(c) for name, c in counts.items() if c}
    known = {name: p for name, p in chosen.items() if coding(p) is not None}
    return known, {name: p for name, p in chosen.items() if name not in known}


def consensus(sites: Iterable[Mapping[str, Pair]]) -> tuple[dict[str, Pair], list[str]]:
    """Per class the pair most sites released (one vote each), and the classes they disagree on."""
    votes: dict[str, Counter[Pair]] = {}
    for released in sites:
        for name, p in released.items():
            votes.setdefault(name, Counter())[p] += 1
    return {name: most_common(c) for name, c in votes.items()}, sorted(name for name, c in votes.items() if len(c) > 1)


def describe(p: Pair) -> str:
    """A pair for a log line or the audit: meanings (from the dictionary) and codes."""
    coded = coding(p)
    meaning = f"{coded[0].meaning} / {coded[1].meaning} " if coded else ""
    return f"{meaning}({p[0]} {p[1]} / {p[2]} {p[3]})"


def stored(pairs: Mapping[str, Pair]) -> dict[str, dict[str, list[str]]]:
    """The run's class codes as a checkpoint and history.json keep them: per class, category and
    type as [scheme, value, meaning], the meaning from the dictionary. Pairs it does not know are left out."""
    out = {}
    for name, p in pairs.items():
        if coded := coding(p):
            out[name] = {"category": [*p[:2], coded[0].meaning], "type": [*p[2:], coded[1].meaning]}
    return out


def from_stored(value: Any) -> dict[str, Coding]:
    """`stored` read back (from a checkpoint) as Codes; whatever the dictionary does not know is dropped."""
    out = {}
    for name, entry in (value.items() if isinstance(value, Mapping) else ()):
        try:
            coded = coding((*entry["category"][:2], *entry["type"][:2]))
        except (KeyError, TypeError):
            coded = None
        if coded:
            out[str(name)] = coded
    return out
