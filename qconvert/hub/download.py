"""Old home of the Hub reader: it lives in :mod:`qconvert.io.hub` (the I/O layer); these names stay
importable from here."""

from ..io.hub import REPO_ID, HubCheckpoint, hub_errors, is_network_error, looks_like_repo_id, open_source

__all__ = ["REPO_ID", "HubCheckpoint", "hub_errors", "is_network_error", "looks_like_repo_id", "open_source"]
