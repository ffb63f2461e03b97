"""Where a site keeps what only its guard may read: the site policy and the privacy ledger, which
are created together and must stay together."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.privacy_ledger import PrivacyLedger
from client.site_policy import PolicyError, SitePolicy, new_policy
from common.folders import Entry


@dataclass(frozen=True)
class SiteState:
    """Where a site keeps what only its guard may read."""

    root: Path
    policy_file = Entry("site_policy.toml")
    ledger_file = Entry("privacy_ledger", "ledger.jsonl")

    def open(self, site: str, create_with: Mapping[str, Any] | None = None) -> tuple[SitePolicy, PrivacyLedger, bool]:
        """The site's policy and ledger. A first start (neither exists) creates both when
        `create_with` is given (policy values); one without the other stops the site."""
        policy_exists, ledger_exists = self.policy_file.exists(), self.ledger_file.exists()
        if not policy_exists and not ledger_exists and create_with is not None:
            self.root.mkdir(parents=True, exist_ok=True)
            ledger = PrivacyLedger.create(self.ledger_file, site)
            new_policy(**{**create_with, "ledger_genesis": ledger.genesis}).save(self.policy_file)
            return SitePolicy.load(self.policy_file), ledger, True
        if not policy_exists:
            raise PolicyError(f"no site policy at {self.policy_file}" + (" although the site has a ledger: restore it from backup"
                                                                          if ledger_exists else ""))
        policy = SitePolicy.load(self.policy_file)
        return policy, PrivacyLedger.open(self.ledger_file, policy.ledger_genesis or None), False
