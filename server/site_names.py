"""Which registered site each Flower node is. Flower keeps node ids only; `fedseg register` writes the
name the coordinator gave each site's key beside the server's state (`sites.json` in the server
folder, the SuperLink's and so the ServerApp's working directory). The server names every reply by
the node it came from through this map, never by the name a reply claims for itself."""

from __future__ import annotations

import json
from pathlib import Path

SITES_FILE = "sites.json"


def read_site_names(folder: Path) -> dict[str, str]:
    """Node id → site name; empty when no site was registered (a simulation, an insecure test server)."""
    path = folder / SITES_FILE
    return {str(k): str(v) for k, v in json.loads(path.read_text()).items()} if path.is_file() else {}


def add_site_name(folder: Path, node_id: str, name: str) -> None:
    (folder / SITES_FILE).write_text(json.dumps({**read_site_names(folder), node_id: name}, indent=1))
