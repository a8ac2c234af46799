"""``from stlm_deploy.client import RemoteDetector`` (README, the ``client`` extra): the client lives in
:mod:`stlm_deploy.serving.client`; this name stays for code written against the documented path."""
from __future__ import annotations

from .serving.client import RemoteDetector, parse_url, server_error

__all__ = ["RemoteDetector", "parse_url", "server_error"]
