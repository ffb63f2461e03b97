"""What travels between the server and a site's courier in a Flower Message. One place for the
layout, so the two sides cannot drift apart.

Model weights travel packed: one flat vector (`arrays`) and its `layout` (names, shapes, dtypes).
Flower moves every array as objects of its own, one HTTP request each per hop (server → SuperLink →
SuperNode → ClientApp and back, two at a time); the U-Net's 80 tensors cost ~20 s per message on a
busy 2-core site, one vector a handful of requests.

A site's reply: `metrics` (MetricRecord), `site` (ConfigRecord: name, status, reason), the packed
DP-SGD weights (train only) and, when the train request asked to validate the weights it brought,
`validation-metrics` and `validation-site` (status, reason) for the previous round's global model.
A train reply may carry `class-codes` (ConfigRecord: class name → [category scheme, value, type
scheme, value], segmentation property codes of pydicom's dictionary only: `common.class_codes`).

The server reads a reply only through `SiteReply.read`, which checks it against the schema below
first: a site is not trusted, so a reply with a record, key, type or range the protocol does not
have is rejected with the reason, never averaged and never a crash.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

if TYPE_CHECKING:
    from common.class_codes import Pair

VALIDATE_RECEIVED = "validate-received"  # a train request's flag: validate the weights sent before training on them
DTYPES = ("float16", "float32", "float64", "int32", "int64")  # what a model tensor may be (nothing that unpickles)
MAX_EXAMPLES = 1_000_000  # patients a site may claim (binned): far above any hospital, far below what swamps an average
STATUSES = ("ok", "refused", "error", "rejected")  # "rejected": the server's word for a validation a train reply lacks


def pack(arrays: Mapping[str, np.ndarray]) -> tuple[ArrayRecord, ConfigRecord]:
    """Named tensors → one flat vector (in the widest of their dtypes) and the layout to undo it."""
    values = [np.asarray(a) for a in arrays.values()]
    layout = ConfigRecord({"names": list(arrays), "ndims": [a.ndim for a in values], "dims": [int(d) for a in values for d in a.shape],
                           "dtypes": [str(a.dtype) for a in values]})
    flat = np.concatenate([a.ravel() for a in values]) if values else np.zeros(0, np.float32)
    return ArrayRecord({"weights": Array(np.ascontiguousarray(flat))}), layout


def unpack(record: ArrayRecord, layout: ConfigRecord) -> dict[str, np.ndarray]:
    """`pack` undone. ValueError when the two do not fit together (a hostile or broken message):
    every count is checked as a plain non-negative int before anything is sliced or allocated."""
    try:
        names, ndims, dims, dtypes = (list(layout[k]) for k in ("names", "ndims", "dims", "dtypes"))
        flat = record["weights"].numpy().ravel()
    except Exception as err:  # noqa: BLE001 — whatever a hostile message makes Flower or numpy raise
        raise ValueError(f"packed weights do not decode: {type(err).__name__}") from err
    counts_ok = all(type(x) is int and 0 <= x <= 2**40 for x in [*ndims, *dims])
    if (not counts_ok or not all(isinstance(n, str) for n in names) or not len(names) == len(ndims) == len(dtypes)
            or sum(ndims) != len(dims) or not set(dtypes) <= set(DTYPES) or flat.dtype.kind not in "fi"):
        raise ValueError("packed weights: inconsistent layout")
    out, start, at = {}, 0, 0
    for name, ndim, dtype in zip(names, ndims, dtypes, strict=True):
        shape = tuple(dims[at:at + ndim])
        at += ndim
        size = math.prod(shape)  # Python ints: no overflow
        if start + size > flat.size:
            raise ValueError("packed weights: the layout asks for more values than were sent")
        out[name] = flat[start:start + size].astype(dtype).reshape(shape)
        start += size
    if start != flat.size:
        raise ValueError(f"packed weights: {flat.size - start} values more than the layout names")
    return out


def weights_content(content: RecordDict, arrays: Mapping[str, np.ndarray]) -> None:
    """Puts `arrays` into `content`, packed."""
    content["arrays"], content["layout"] = pack(arrays)


def weights_of(content: RecordDict) -> dict[str, np.ndarray]:
    """The weights a message carries, unpacked; {} when it carries none. ValueError if they do not unpack."""
    if "arrays" not in content.array_records:
        return {}
    return unpack(content["arrays"], content.config_records.get("layout", ConfigRecord()))


def _status(header: Mapping[str, Any]) -> ConfigRecord:
    return ConfigRecord({"status": str(header.get("status", "error")), "reason": str(header.get("code", ""))})


def _numbers(metrics: Any) -> MetricRecord:
    items = dict(metrics).items() if isinstance(metrics, Mapping) else ()
    return MetricRecord({k: v for k, v in items if isinstance(v, (int, float)) and not isinstance(v, bool)})


def reply_content(header: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> RecordDict:
    """The guard's answer (header, arrays) as a reply's content; only numbers and codes pass."""
    site = _status(header)
    site["name"] = str(header.get("site", ""))
    content = RecordDict({"metrics": _numbers(header.get("metrics")), "site": site})
    if arrays:
        weights_content(content, arrays)
    codes = header.get("class_codes")
    if isinstance(codes, Mapping) and codes:
        content["class-codes"] = ConfigRecord({str(k): [str(x) for x in v] for k, v in codes.items() if isinstance(v, (list, tuple))})
    validation = header.get("validation")
    if isinstance(validation, Mapping):
        content["validation-metrics"] = _numbers(validation.get("metrics"))
        content["validation-site"] = _status(validation)
    return content


@dataclass(frozen=True)
class Field:
    """A metric's type and closed range. `nan`: the site may not know it (a class absent from its
    validation patients gives NaN Dice, IoU and HD95 for that class)."""

    kind: type
    low: float
    high: float
    nan: bool = False

    def problem(self, key: str, value: Any) -> str | None:
        """Why `value` does not fit, or None."""
        if self.kind is int and type(value) is not int or self.kind is float and type(value) not in (int, float):
            return f"has {key} of type {type(value).__name__}, not {'an integer' if self.kind is int else 'a number'}"
        if math.isnan(value) and self.nan:
            return None
        if not self.low <= value <= self.high:  # NaN fails this too
            return f"has {key} {value!r}, outside [{self.low:g}, {self.high:g}]"
        return None


EXAMPLES = Field(int, 1, MAX_EXAMPLES)
SHARE = Field(float, 0.0, 1.0, nan=True)  # Dice, IoU
SPENT = {"epsilon": Field(float, 0.0, math.inf), "seconds": Field(float, 0.0, 1e7)}
TRAIN_METRICS = {"num-examples": EXAMPLES, **SPENT, "noise-multiplier": Field(float, 0.0, 100.0),
                 "train-loss": Field(float, 0.0, 1e6), "steps": Field(int, 0, 10**9)}
# "dice" itself must be a number: it is what validation averages.
VALIDATION_METRICS = {"num-examples": EXAMPLES, **SPENT, "dice": Field(float, 0.0, 1.0), "iou": SHARE,
                      "hd95": Field(float, 0.0, 1e6, nan=True)}
PER_CLASS = re.compile(r"dice-class[1-9][0-9]?")  # dice-class1 ... dice-class99
# The records each reply may hold (name → kind); validation-* ride in a train reply, read as a validation.
RECORDS = {True: {"metrics": "metric", "site": "config", "arrays": "array", "layout": "config", "class-codes": "config",
                  "validation-metrics": "metric", "validation-site": "config"},
           False: {"metrics": "metric", "site": "config"}}


class ReplyError(ValueError):
    """A reply that does not follow the protocol; the message is the reason recorded for it."""


def _records_problem(content: RecordDict, train: bool) -> str | None:
    kinds = {**{k: "array" for k in content.array_records}, **{k: "metric" for k in content.metric_records},
             **{k: "config" for k in content.config_records}}
    allowed = RECORDS[train]
    for name, kind in kinds.items():
        if allowed.get(name) != kind:
            return f"has an unexpected {kind} record {name[:40]!r}"
    missing = [n for n in ("metrics", "site") if n not in kinds]
    return f"has no {missing[0]} record" if missing else None


def _site_problem(site: ConfigRecord) -> str | None:
    """The site record: known keys, short printable text, a status of the protocol's."""
    for key, value in site.items():
        if key not in ("name", "status", "reason"):
            return f"has an unexpected site key {key[:40]!r}"
        if not isinstance(value, str) or not value.isprintable() or len(value) > 300:
            return f"has a site {key} that is not printable text of at most 300 characters"
    return None if site.get("status") in STATUSES else f"has status {str(site.get('status'))[:40]!r}, not one of {', '.join(STATUSES)}"


def _metrics_problem(metrics: MetricRecord, train: bool, ok: bool) -> str | None:
    schema = TRAIN_METRICS if train else VALIDATION_METRICS
    for key, value in metrics.items():
        field = schema.get(key, SHARE if not train and PER_CLASS.fullmatch(key) else None)
        if field is None:
            return f"has an unexpected metric {key[:40]!r}"
        if problem := field.problem(key, value):
            return problem
    required = ("num-examples",) if train else ("num-examples", "dice")
    return next((f"has no {key}" for key in required if ok and key not in metrics), None)


def _codes_problem(codes: ConfigRecord, classes: Sequence[str]) -> str | None:
    """The class codes: only the run's classes, each a segmentation property category (CID 7150) and type
    (CID 7151) of pydicom's dictionary, as four strings (imported here, on the server: the courier, which
    only passes the guard's codes on, never loads it)."""
    from common.class_codes import coding

    for name, value in codes.items():
        if name not in classes:
            return f"has class codes for {name[:40]!r}, not a class of the run"
        if coding(value) is None:
            return f"has class codes for {name!r} that are not a segmentation property category and type (CID 7150, 7151)"
    return None


def reply_problem(content: RecordDict, train: bool, classes: Sequence[str] = ()) -> str | None:
    """Why a train (or validation) reply's content breaks the protocol ("has ..."), or None. Only records,
    keys, types and ranges the protocol has pass; an "ok" reply must carry what it is weighed by
    (and a validation its Dice; a train reply its weights); class codes only for `classes`, the run's."""
    problem = _records_problem(content, train) or _site_problem(content["site"])
    if problem:
        return problem
    ok = content["site"]["status"] == "ok"
    if train and ok and "arrays" not in content.array_records:
        return "has no weights"
    if "class-codes" in content.config_records and (problem := _codes_problem(content["class-codes"], classes)):
        return problem
    return _metrics_problem(content["metrics"], train, ok)


def claimed_name(msg: Message, default: str) -> str:
    """The name a reply claims for its site, if it is short printable text; else `default`. The
    server uses it only where no site is registered (a simulation); otherwise it names a reply by its node."""
    name = msg.content.config_records.get("site", ConfigRecord()).get("name", "")
    return name if isinstance(name, str) and name and name.isprintable() and len(name) <= 300 else default


@dataclass
class SiteReply:
    """What the server reads from a reply once it follows the protocol."""

    status: str
    reason: str
    metrics: MetricRecord
    class_codes: dict[str, Pair]  # class name → its coding, as the site's SEGs code it ({}: none released)

    @classmethod
    def read(cls, msg: Message, train: bool, classes: Sequence[str] = ()) -> SiteReply:
        """The reply, checked against the protocol first: ReplyError with the reason if it breaks it.
        `classes`: the run's foreground classes, the only ones a reply may carry codes for."""
        problem = reply_problem(msg.content, train, classes)
        if problem:
            raise ReplyError(f"{'train' if train else 'validation'} reply {problem}")
        site = msg.content["site"]
        codes = msg.content.config_records.get("class-codes", ConfigRecord())
        return cls(site["status"], str(site.get("reason", "")), msg.content["metrics"], {k: tuple(v) for k, v in codes.items()})


def received_validation(reply: Message, request: Message) -> Message:
    """A train reply's validation of the weights it was sent, as a validation reply of its own
    (errors stay errors; its records as the site sent them, for `SiteReply.read` to check), so the
    previous round closes exactly as if a validate message had run."""
    if reply.has_error():
        return reply
    site = reply.content.config_records.get("site", ConfigRecord())
    status = reply.content.config_records.get("validation-site", ConfigRecord({"status": "rejected", "reason": "reply carries no validation"}))
    content = RecordDict({"metrics": reply.content.metric_records.get("validation-metrics", MetricRecord()),
                          "site": ConfigRecord({**dict(status), "name": str(site.get("name", ""))})})
    return Message(content=content, reply_to=request)
