"""A ledger cut short at its end still forms a valid chain; the head kept beside it catches that,
and an older backup of the ledger restored on its own."""

import shutil

import pytest

from client.privacy_ledger import LedgerError, PrivacyLedger


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
    ledger.head_path.unlink()  # a ledger from before heads were kept: the head is written, nothing refused
    assert PrivacyLedger.open(ledger.path).entries == ledger.entries and ledger.head_path.is_file()
