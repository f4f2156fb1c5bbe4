"""Training data named by its id on the Hugging Face hub: `owner/name`, or `owner/name/folder` for one
subset of a dataset that has several (sentence-transformers/all-nli/pair).

Only the dataset's data files are fetched (`huggingface_hub.snapshot_download`, into the hub's cache;
offline, from that cache), never a loading script or other code; the folder they land in is then read
like any folder of data files (`readers`: its train split, one subset, one format).
"""

from __future__ import annotations

import re
from pathlib import Path

from embedtune.data.formats import DATA_SUFFIXES
from embedtune.errors import DataError

# owner/name[/folder...], as the hub spells ids: no leading dot or slash, so no relative or absolute path
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(/[\w.-]+)*")


def is_hub_id(name: str) -> bool:
    """Whether ``name``, which is no local path, reads as a dataset id rather than a mistyped file name."""
    return _HUB_ID.fullmatch(name) is not None and not name.lower().endswith(DATA_SUFFIXES)


def dataset_folder(name: str) -> Path:
    """The local folder holding the data files of hub dataset ``name`` (and its subset folder, if named)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    owner, repo, *folder = name.split("/")
    prefix = "".join(part + "/" for part in folder)
    try:
        root = snapshot_download(f"{owner}/{repo}", repo_type="dataset",
                                 allow_patterns=[f"{prefix}*{suffix}" for suffix in DATA_SUFFIXES])
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as e:
        reason = " ".join(str(e).split())
        raise DataError(f"{name}: no such file or directory, nor a dataset on the Hugging Face hub that could be "
                        f"fetched ({reason[:200]})") from None
    path = Path(root, *folder)
    if not path.is_dir():
        raise DataError(f"{name}: the hub dataset {owner}/{repo} has no data files under {'/'.join(folder)}")
    return path
