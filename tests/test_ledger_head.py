"""A ledger cut short at its end still forms a valid chain; the head kept beside it catches that,
and an older backup of the ledger restored on its own."""

import json
import shutil

import pytest

from client.privacy_ledger import LedgerError, PrivacyLedger, _digest


def _ledger(tmp_path):
    ledger = PrivacyLedger.create(tmp_path / "ledger.jsonl", "north")
    ledger.append("train", event=[1.0, 0.1, 10], run="1", round=1)
    return ledger


def test_a_ledger_cut_at_its_end_stops_the_site(tmp_path):
    ledger = _ledger(tmp_path)
    ledger.append("train", event=[1.0, 0.1, 10], run="1", round=2)
    lines = ledger.path.read_text().splitlines(keepends=True)
    ledger.path.write_text("".join(lines[:-1]))  # the last round's spend, gone; the chain still holds
    with pytest.raises(LedgerError, match="ends before line 3"):
        PrivacyLedger.open(ledger.path)


def test_an_older_backup_restored_alone_stops_the_site(tmp_path):
    ledger = _ledger(tmp_path)
    shutil.copy(ledger.path, tmp_path / "backup.jsonl")
    ledger.append("train", event=[1.0, 0.1, 10], run="2", round=1)
    shutil.copy(tmp_path / "backup.jsonl", ledger.path)
    with pytest.raises(LedgerError, match="older backup"):
        PrivacyLedger.open(ledger.path)


def test_an_intact_ledger_opens_and_its_head_follows_every_line(tmp_path):
    ledger = _ledger(tmp_path)
    again = PrivacyLedger.open(ledger.path)
    assert again.entries == ledger.entries
    ledger.head_path.unlink()  # deleting the head to hide a cut: refused, not recreated
    with pytest.raises(LedgerError, match="head file .* is missing"):
        PrivacyLedger.open(ledger.path)


def test_a_ledger_from_before_heads_starts_keeping_one(tmp_path):
    ledger = _ledger(tmp_path)
    old = [json.loads(line) for line in ledger.path.read_text().splitlines()]
    del old[0]["keeps_head"]  # as written by an older fedseg: rebuild its chain without the flag
    old[0]["hash"] = _digest(old[0])
    old[1]["prev"], old[1]["hash"] = old[0]["hash"], None
    old[1]["hash"] = _digest(old[1])
    ledger.path.write_text("".join(json.dumps(e, sort_keys=True) + "\n" for e in old))
    ledger.head_path.unlink()
    assert len(PrivacyLedger.open(ledger.path).entries) == 2 and ledger.head_path.is_file()
