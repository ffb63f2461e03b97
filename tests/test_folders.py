"""The folder layouts are an on-disk contract: a server or site folder made by an earlier version, and
the README's walk-through, must still find every file where it was."""

from __future__ import annotations

from client.site_state import SiteState
from client.supernode import SiteFolder
from common.credentials import ServerCertificates, SiteKeys
from server.superlink import ServerFolder


def test_the_server_folder_keeps_its_files_where_they_were(tmp_path):
    folder = ServerFolder(tmp_path)
    assert folder.certs == ServerCertificates(tmp_path / "certs")
    assert [folder.certs.ca_cert, folder.certs.ca_key, folder.certs.server_cert, folder.certs.server_key] == [
        tmp_path / "certs" / name for name in ("ca.crt", "ca.key", "server.crt", "server.key")]
    assert (folder.flwr_home, folder.connection_file) == (tmp_path / ".flwr", tmp_path / ".flwr" / "config.toml")
    assert (folder.state_db, folder.log_file) == (tmp_path / "state.db", tmp_path / "logs" / "superlink.log")
    assert (folder.lock_file, folder.spool_record) == (tmp_path / ".lock", tmp_path / "edge" / "spool")


def test_the_site_folder_keeps_its_files_where_they_were(tmp_path):
    folder = SiteFolder(tmp_path)
    assert folder.keys == SiteKeys(tmp_path) and folder.state == SiteState(tmp_path)
    assert (folder.keys.private_key, folder.keys.public_key) == (tmp_path / "site.key", tmp_path / "site.pub")
    assert (folder.state.policy_file, folder.state.ledger_file) == (tmp_path / "site_policy.toml",
                                                                    tmp_path / "privacy_ledger" / "ledger.jsonl")
    assert (folder.node_config_file, folder.flwr_home) == (tmp_path / "node_config.toml", tmp_path / ".flwr")
    assert (folder.log_file, folder.superexec_log_file) == (tmp_path / "logs" / "supernode.log", tmp_path / "logs" / "superexec.log")
