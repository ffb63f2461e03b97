"""The ledger's ε is what Opacus' own RDP accountant says for the same history."""

import warnings

import pytest
from opacus.accountants import RDPAccountant

from client.privacy_ledger import rdp_epsilon


def test_rdp_epsilon_equals_opacus_accountant_loaded_with_the_history():
    history = [(1.1, 0.25, 40), (0.9, 0.5, 12), (1.1, 0.25, 40)]  # a repeated entry: the ledger's cache must not change it
    accountant = RDPAccountant()
    accountant.load_state_dict({"history": history, "mechanism": accountant.mechanism()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "optimal order is the largest alpha"
        expected = accountant.get_epsilon(delta=1e-5)
    assert rdp_epsilon(history, 1e-5) == pytest.approx(expected, rel=1e-12)
