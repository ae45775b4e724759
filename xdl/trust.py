"""Code trust: a run, a model or a dataset from elsewhere never names code that runs unless
the user says so — the shape of Hugging Face's ``trust_remote_code``.
"""

from __future__ import annotations

import os

from xdl.errors import XdlError

ENV = "XDL_TRUST_CODE"


def trusted(flag: bool | None = None) -> bool:
    """True when the user passed ``--trust-code``/``trust_code=True`` or set XDL_TRUST_CODE=1."""
    return bool(flag) or os.environ.get(ENV, "") == "1"


def require_trust(what: str, flag: bool | None = None) -> None:
    """Refuse, before importing anything, unless code from ``what`` is trusted."""
    if not trusted(flag):
        raise XdlError(
            f"{what} names code to import; run it only if you trust its source: pass --trust-code "
            f"(trust_code=True in Python, or {ENV}=1)"
        )
