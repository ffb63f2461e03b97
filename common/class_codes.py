"""What a class is, in codes: the segmented property category and type of a DICOM-SEG segment.

A model learns what its sites' SEGs' segments are, so the SEGs it predicts carry their codes, not
a guess from the class name ("bone" is no organ). Only segmentation property codes travel: a category
of pydicom's CID 7150 and a type of its CID 7151 (with the groups 7151 includes: anatomy, tissue,
lesions, devices; ~900 concepts), not the whole dictionary, whose ~15,000 concepts include diagnoses
("HIV Positive"). A site releases (scheme designator, code value) pairs, and every reader takes the
meaning from pydicom, never from a file or a message (free text in a hospital's file could carry anything).

A class's coding travels as a `Pair`; a checkpoint and history.json store it with its meanings
(`stored`), and a model reads it back as pydicom Codes (`from_stored`).
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

if TYPE_CHECKING:
    import highdicom as hd

log = logging.getLogger(__name__)

Pair = tuple[str, str, str, str]  # (category scheme, category value, type scheme, type value)
Coding = tuple[Code, Code]  # (segmented property category, segmented property type), meanings from the dictionary
# A class whose SEGs gave no codes (NIfTI labels, older runs, no agreement): says nothing it does not know.
GENERIC: Coding = (codes.SCT.AnatomicalStructure, codes.SCT.AnatomicalStructure)
MAX_TEXT = 64  # a scheme designator, code value or meaning (DICOM SH/UC/LO): anything longer is not a code
CATEGORIES, TYPES = 7150, 7151  # Segmentation Property Categories; Segmentation Property Types


@functools.cache
def vocabulary(cid: int) -> dict[tuple[str, str], Code]:
    """A context group's concepts by (scheme, value), as pydicom lists them. A meaning longer than
    MAX_TEXT is no code: highdicom's SEG writer refuses it (none in pydicom 3.0's groups, but a
    release of pydicom could add one, and `fedseg predict` must not fail on it)."""
    concepts = getattr(codes, f"cid{cid}").concepts.values()
    return {(c.scheme_designator, c.value): c for c in concepts if len(c.meaning) <= MAX_TEXT}


def concept(cid: int, scheme: Any, value: Any) -> Code | None:
    """The group's concept for (scheme, value), with its meaning; None for anything else."""
    return vocabulary(cid).get((scheme, value)) if isinstance(scheme, str) and isinstance(value, str) else None


def coding(pair: Any) -> Coding | None:
    """A released pair as Codes: a category of CID 7150 and a type of CID 7151; None when it is not
    four such strings."""
    if not isinstance(pair, Sequence) or isinstance(pair, str) or len(pair) != 4:
        return None
    category, kind = concept(CATEGORIES, pair[0], pair[1]), concept(TYPES, pair[2], pair[3])
    return (category, kind) if category and kind else None


def pair_of(description: hd.seg.SegmentDescription) -> Pair:
    """A segment's coding as its file writes it (not yet checked against the dictionary); each text cut
    just past MAX_TEXT, so a hostile file's megabyte "code" costs nothing and still matches no concept."""
    category, kind = description.segmented_property_category, description.segmented_property_type
    texts = (category.scheme_designator, category.value, kind.scheme_designator, kind.value)
    return tuple(str(t)[:MAX_TEXT + 1] for t in texts)  # type: ignore[return-value]


def releasable(counts: Mapping[str, Counter[Pair]], minimum: int) -> tuple[dict[str, Pair], dict[str, str]]:
    """A site's release: per class its pair when EVERY SEG the site uses for the class codes it so, at
    least `minimum` SEGs do, and the pair is a segmentation property code; so no one SEG chooses what
    is released (one disagreeing SEG can only withhold it). And why each other class releases nothing
    (for the site's own log: it names codes, never files)."""
    released, withheld = {}, {}
    for name, counted in ((name, c) for name, c in counts.items() if c):
        (p, n), *others = counted.most_common()
        if others:
            withheld[name] = f"its DICOM-SEGs code it {len(counted)} ways: " + "; ".join(
                f"{describe(q)} in {k}" for q, k in counted.most_common())
        elif coding(p) is None:
            withheld[name] = f"coded {describe(p)}, not a segmentation property category (CID 7150) and type (CID 7151)"
        elif n < minimum:
            withheld[name] = f"coded {describe(p)} in {n} DICOM-SEG(s), fewer than {minimum}"
        else:
            released[name] = p
    return released, withheld


def consensus(sites: Iterable[Mapping[str, Pair]]) -> tuple[dict[str, Pair], list[str]]:
    """Per class the pair a strict majority of the sites that released one for it released (one vote
    each), and the classes they disagree on. Without a majority a class has no pair (generic coding):
    of two sites, neither chooses for the other."""
    votes: dict[str, Counter[Pair]] = {}
    for released in sites:
        for name, p in released.items():
            votes.setdefault(name, Counter())[p] += 1
    agreed = {}
    for name, c in votes.items():
        (p, n), = c.most_common(1)
        if 2 * n > c.total():
            agreed[name] = p
    return agreed, sorted(name for name, c in votes.items() if len(c) > 1)


def describe(p: Pair) -> str:
    """A pair for a log line or the audit: meanings (from the dictionary) and codes; a pair that is
    no code, as escaped text."""
    if coded := coding(p):
        return f"{coded[0].meaning} / {coded[1].meaning} ({p[0]} {p[1]} / {p[2]} {p[3]})"
    texts = [ascii(t) for t in p]  # a file's text: escaped, so it cannot forge or hide a line of the site's log
    return f"({' '.join(texts[:2])} / {' '.join(texts[2:])})"


def stored(pairs: Mapping[str, Pair]) -> dict[str, dict[str, list[str]]]:
    """The run's class codes as a checkpoint and history.json keep them: per class, category and
    type as [scheme, value, meaning], the meaning from the dictionary. Pairs it does not know are left out."""
    out = {}
    for name, p in pairs.items():
        if coded := coding(p):
            out[name] = {"category": [*p[:2], coded[0].meaning], "type": [*p[2:], coded[1].meaning]}
    return out


def from_stored(value: Any) -> dict[str, Coding]:
    """`stored` read back (from a checkpoint) as Codes; whatever is no segmentation property code is
    dropped, with a warning, and that class's segments are coded `GENERIC`: a checkpoint never stops a prediction."""
    out = {}
    for name, entry in (value.items() if isinstance(value, Mapping) else ()):
        try:
            coded = coding((*entry["category"][:2], *entry["type"][:2]))
        except (KeyError, TypeError):
            coded = None
        if coded:
            out[str(name)] = coded
        else:
            log.warning("class %r: the checkpoint's codes are no segmentation property category and type; "
                        "its segments are coded generically", str(name)[:MAX_TEXT])
    return out
