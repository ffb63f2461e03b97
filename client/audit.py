"""`fedseg audit`: the privacy ledger as a privacy officer reads it — every release and refusal, what
left the site, the ε before and after — once its hash chain has been checked."""

from __future__ import annotations

from client.privacy_ledger import PrivacyLedger
from client.site_policy import SitePolicy
from common.class_codes import describe


def _what(entry: dict) -> str:
    if entry["kind"] == "train":
        sigma, q, steps = entry["event"]
        return (f"DP-SGD σ {sigma:.2f}, patient sampling rate {q:.3f}, {steps} steps; ε {entry['epsilon_before']:.2f} → "
                f"{entry['epsilon_after']:.2f}; weights sha256 {entry['released_sha256'][:16]}; {_metrics(entry['metrics'])}"
                + "".join(f"; class {name} coded {describe(tuple(pair))}" for name, pair in entry.get("class_codes", {}).items()))
    if entry["kind"] == "validate":
        return f"validated weights sha256 {entry['received_sha256'][:16]}; released {_metrics(entry['metrics'])}"
    if entry["kind"] == "refusal":
        return f"refused {entry.get('request') or 'request'}: {entry['code']} (nothing released)"
    return f"ledger created for site {entry.get('site', '?')}"


def _metrics(metrics: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in metrics.items())


def audit_table(ledger: PrivacyLedger, policy: SitePolicy) -> str:
    releases = sum(e["kind"] in ("train", "validate") for e in ledger.entries)
    lines = [
        f"privacy ledger {ledger.path}: hash chain OK, {len(ledger.entries)} lines, genesis {ledger.genesis[:16]}",
        f"unit of privacy: the patient; ε spent {ledger.epsilon(policy.delta):.3f} of budget {policy.epsilon_budget:g} "
        f"at δ {policy.delta:g} (Opacus RDP accountant over every training line); {releases} releases",
        "",
        "| # | time | kind | run | round | what |",
        "|---:|---|---|---|---:|---|",
    ]
    for e in ledger.entries:
        lines.append(f"| {e['seq']} | {e['time']} | {e['kind']} | {e.get('run', '')} | {e.get('round', '')} | {_what(e)} |")
    return "\n".join(lines)
