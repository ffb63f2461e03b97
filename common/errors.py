"""The one base class for errors a person operating fedseg must act on.

Library code raises these instead of ending the process; `fedseg` (common/cli.py) turns any of them
into its message and exit status 1, so a caller such as a test or the bench can still catch them."""

from __future__ import annotations


class FedsegError(Exception):
    """Something the operator can fix. The message is for a person: what went wrong and what to do.
    It never carries patient data (no pixel values, no patient names or identifiers)."""
