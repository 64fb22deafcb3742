"""Default locations of the training inputs and outputs."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR_VARIABLE = "JOEYBOT_SHARED_DIR"


def shared_dir() -> Path:
    """Return ``$JOEYBOT_SHARED_DIR``, else the folder ``shared`` beside the repository."""
    return Path(os.environ.get(SHARED_DIR_VARIABLE, REPO_ROOT.parent / "shared"))


def default_transcripts_dir() -> Path:
    return shared_dir() / "data" / "friends-transcripts"
