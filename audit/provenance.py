"""What produced a run: package versions and the code revision, for run.json."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import audit

PACKAGES = (
    "memaudit", "torch", "torchvision", "diffusers", "transformers", "tokenizers", "safetensors",
    "open_clip_torch", "ray", "pyarrow", "numpy", "pillow", "pydantic",
)


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def code_revision() -> dict[str, Any]:
    """The git commit of the source tree memaudit runs from (and whether it had local changes),
    or the commit pip recorded when installing from a VCS URL; else only the version."""
    source = Path(audit.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip() != ""
        return {"git_commit": commit, "dirty": dirty, "version": audit.__version__}
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        direct = metadata.distribution("memaudit").read_text("direct_url.json")
        vcs = json.loads(direct or "{}").get("vcs_info", {})
        if vcs.get("commit_id"):
            return {"git_commit": vcs["commit_id"], "dirty": None, "version": audit.__version__}
    except metadata.PackageNotFoundError:
        pass
    return {"git_commit": None, "dirty": None, "version": audit.__version__}


def environment() -> dict[str, Any]:
    return {
        "packages": package_versions(),
        "code": code_revision(),
        "platform": platform.platform(),
        "argv": sys.argv,
    }
