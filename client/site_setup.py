"""`fedseg site-init`: a new site's key pair, site policy and privacy ledger, made once and never
replaced (a new key or ledger would have to be registered or audited again)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.privacy_ledger import PrivacyLedger
from client.site_policy import PolicyError, SitePolicy
from client.site_state import SiteState
from common.credentials import SiteKeys, create_site_keys
from common.errors import FedsegError


class SiteSetupError(FedsegError):
    """The site cannot be set up: it already is, or the policy values are refused."""


@dataclass(frozen=True)
class NewSite:
    state: SiteState
    policy: SitePolicy
    ledger: PrivacyLedger
    keys: SiteKeys


def init_site(root: Path, name: str, policy_values: Mapping[str, Any]) -> NewSite:
    """Creates the site's policy and ledger, then its key pair, in `root` (owner-only afterwards).
    Refuses a folder that already holds a policy or a ledger: fedseg never replaces them."""
    state = SiteState(root)
    if state.policy_file.exists() or state.ledger_file.exists():
        raise SiteSetupError(f"{root} is already set up (site_policy.toml / privacy_ledger): fedseg never replaces them")
    try:
        policy, ledger, _ = state.open(name, policy_values)
    except PolicyError as err:
        raise SiteSetupError(str(err)) from err
    keys = create_site_keys(root, name)
    root.chmod(0o700)  # policy, ledger and key: the site's alone
    return NewSite(state, policy, ledger, keys)
