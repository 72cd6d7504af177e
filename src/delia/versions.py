"""Library versions for manifests: what a result was produced with."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

CORE = ("delia", "torch", "transformers", "trl", "peft", "datasets", "accelerate", "sacrebleu")


def library_versions(*extra: str) -> dict[str, str]:
    """Python and the installed versions of delia's core libraries plus `extra` (missing ones left out)."""
    out = {"python": platform.python_version()}
    for pkg in (*CORE, *extra):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out
