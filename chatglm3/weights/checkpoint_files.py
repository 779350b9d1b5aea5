"""Whether a folder holds a whole ChatGLM3 checkpoint, by its files alone (no tensor is read).

Checked for a folder given by hand and after every download. What is inside a shard is the
loader's to check (checkpoint._open_shard names a damaged one).
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

from ..errors import SetupError


class WeightsError(SetupError):
    """The checkpoint could not be fetched or is incomplete; the message names what and where."""


# (index, single file) of each weight format, in the order the loader looks for them.
LAYOUTS = [("model.safetensors.index.json", "model.safetensors"),
           ("pytorch_model.bin.index.json", "pytorch_model.bin")]


def verify_checkpoint_files(path: Path) -> None:
    """Raises WeightsError unless `path` holds a complete checkpoint."""
    if found := problems(Path(path)):
        raise WeightsError(describe(Path(path), found))


def problems(d: Path, sizes: dict[str, int] | None = None) -> dict[str, str]:
    """What is wrong with checkpoint folder `d`, by file name ("" for the folder itself).

    Files present, at the hub's sizes (`sizes`, when known), config.json an object, the
    tokenizer not empty, the index readable and its shards present.
    """
    if not d.is_dir():
        return {"": "not a directory"}
    out = {n: "missing" if not (d / n).is_file() else f"{(d / n).stat().st_size} bytes, but the hub has {s}"
           for n, s in (sizes or {}).items() if not (d / n).is_file() or (d / n).stat().st_size != s}
    try:
        if "config.json" not in out and not isinstance(json.loads((d / "config.json").read_bytes()), dict):
            out["config.json"] = "not a JSON object"
    except (OSError, ValueError) as e:
        out["config.json"] = "missing" if isinstance(e, FileNotFoundError) else f"unreadable JSON ({e})"
    tok = d / "tokenizer.model"
    if "tokenizer.model" not in out and not (tok.is_file() and tok.stat().st_size > 0):
        out["tokenizer.model"] = "empty" if tok.exists() else "missing"
    for index, single in LAYOUTS:
        if (d / index).is_file():
            try:
                shards = set(json.loads((d / index).read_bytes())["weight_map"].values())
                if not shards or not all(isinstance(s, str) for s in shards):
                    raise ValueError("weight_map is not a non-empty {tensor: file} map")
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                return {**out, index: out.get(index, f"unreadable index ({e!s})")}
            if bad := [s for s in shards if PurePosixPath(s).is_absolute() or ".." in s.split("/")]:
                return {**out, index: f"names a shard outside the folder: {bad[0]!r}"}
            return {**out, **{s: "missing (named in the index)" for s in sorted(shards - out.keys())
                              if not (d / s).is_file()}}
        if (d / single).is_file():
            return out
    return {**out, "": "no weight files (no model.safetensors[.index.json] nor "
                       "pytorch_model.bin[.index.json])"}


def describe(d: Path, found: dict[str, str]) -> str:
    """One line naming every problem of `found` (from problems()) in words: the folder, then
    what is wrong with each file ("config.json: missing; no weight files (...)"), the first six
    and how many more."""
    if set(found) == {""}:
        return f"{d}: {found['']}"
    if not d.is_dir() or not any(d.iterdir()):
        return f"{d}: {'empty folder' if d.is_dir() else found.get('', 'not a directory')}: " \
               "no config.json, no tokenizer.model, no weight files"
    if len(found) == 1:
        ((name, why),) = found.items()
        return f"{d / name}: {why}"
    items = [why if not name else f"{name}: {why}" for name, why in found.items()]
    more = f"; and {len(items) - 6} more" if len(items) > 6 else ""
    return f"{d}: {'; '.join(items[:6])}{more}"
