"""A site's reply as it travels in a Flower Message: written by the courier ClientApp, read by the
server's strategy. One place for the layout, so the two cannot drift apart.

Content: `metrics` (MetricRecord), `site` (ConfigRecord: name, status, reason), `arrays` (the DP-SGD
weights, train only) and, when the train request asked to validate the weights it brought,
`validation-metrics` and `validation-site` (status, reason) for the previous round's global model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

VALIDATE_RECEIVED = "validate-received"  # a train request's flag: validate the weights sent before training on them


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
        content["arrays"] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    validation = header.get("validation")
    if isinstance(validation, Mapping):
        content["validation-metrics"] = _numbers(validation.get("metrics"))
        content["validation-site"] = _status(validation)
    return content


@dataclass
class SiteReply:
    """What the server reads from a reply. The name is what the reply claims; the server keeps it."""

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
