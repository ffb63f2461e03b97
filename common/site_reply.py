"""What travels between the server and a site's courier in a Flower Message. One place for the
layout, so the two sides cannot drift apart.

Model weights travel packed: one flat vector (`arrays`) and its `layout` (names, shapes, dtypes).
Flower moves every array as objects of its own, one HTTP request each per hop (server → SuperLink →
SuperNode → ClientApp and back, two at a time); the U-Net's 80 tensors cost ~20 s per message on a
busy 2-core site, one vector a handful of requests.

A site's reply: `metrics` (MetricRecord), `site` (ConfigRecord: name, status, reason), the packed
DP-SGD weights (train only) and, when the train request asked to validate the weights it brought,
`validation-metrics` and `validation-site` (status, reason) for the previous round's global model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

VALIDATE_RECEIVED = "validate-received"  # a train request's flag: validate the weights sent before training on them
DTYPES = ("float16", "float32", "float64", "int32", "int64")  # what a model tensor may be (nothing that unpickles)


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
    validation = header.get("validation")
    if isinstance(validation, Mapping):
        content["validation-metrics"] = _numbers(validation.get("metrics"))
        content["validation-site"] = _status(validation)
    return content


@dataclass
class SiteReply:
    """What the server reads from a reply. `name` is what the reply claims: the server uses it only
    where no site is registered (a simulation); otherwise it names the reply by its node."""

    name: str
    status: str
    reason: str
    metrics: MetricRecord

    @classmethod
    def read(cls, msg: Message, default_name: str) -> SiteReply:
        site = msg.content.config_records.get("site", ConfigRecord())
        return cls(str(site.get("name", "") or default_name), str(site.get("status", "ok")), str(site.get("reason", "")),
                   msg.content.metric_records.get("metrics", MetricRecord()))


def received_validation(reply: Message, request: Message) -> Message:
    """A train reply's validation of the weights it was sent, as a validation reply of its own
    (errors stay errors), so the previous round closes exactly as if a validate message had run."""
    if reply.has_error():
        return reply
    site = reply.content.config_records.get("site", ConfigRecord())
    status = reply.content.config_records.get("validation-site", ConfigRecord({"status": "rejected", "reason": "reply carries no validation"}))
    content = RecordDict({"metrics": reply.content.metric_records.get("validation-metrics", MetricRecord()),
                          "site": ConfigRecord({"name": str(site.get("name", "")), "status": str(status.get("status", "rejected")),
                                                "reason": str(status.get("reason", ""))})})
    return Message(content=content, reply_to=request)
