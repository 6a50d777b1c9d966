"""Reading and verifying an export's manifest.json: the contract between export time and run time.

Lives in the core so that both the exporter (which writes it) and the runtime (which trusts nothing
that does not match it) use the same reader, and the runtime never imports the exporter. The schema
is documented in vzedge.export.manifest, its writer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from vzedge.io import sha256_file

MANIFEST_NAME = "manifest.json"
SCHEMA = "vzedge.vision-graph"
SCHEMA_VERSION = 1


def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse folder/manifest.json; ValueError if missing, unreadable or of another schema."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise ValueError(f"{folder} has no {MANIFEST_NAME}: it is not a finished vzedge export")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not readable JSON ({err}); re-export into this folder with --force") from err
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ValueError(f"{path} is not a vzedge vision-graph manifest (schema {SCHEMA!r} expected)")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(
            f"{path} has schema_version {data.get('schema_version')!r}; this vzedge reads {SCHEMA_VERSION}: "
            "re-export with this version"
        )
    return data


def inside(folder: str | os.PathLike[str], rel: Any, what: str) -> Path:
    """`folder/rel` if `rel` is a relative path that stays inside `folder` (symlinks resolved), else ValueError.

    Every path a manifest names goes through here: an edited manifest must not make the runtime load a file
    from elsewhere (`../other/model.onnx`, an absolute path, a symlink out of the folder).
    """
    folder = Path(folder)
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise ValueError(f"{folder}/{MANIFEST_NAME}: {what} {rel!r} is not a file name; re-export the model")
    pure = Path(rel)
    if pure.is_absolute() or ".." in pure.parts:
        raise ValueError(
            f"{folder}/{MANIFEST_NAME}: {what} {rel!r} points outside the export folder; the runtime only loads "
            "files inside it: re-export the model"
        )
    path = folder / pure
    root = folder.resolve()
    if not path.resolve().is_relative_to(root):
        raise ValueError(f"{folder}/{MANIFEST_NAME}: {what} {rel!r} resolves outside {folder} (a symlink?)")
    return path


def verify_files(folder: str | os.PathLike[str], manifest: dict[str, Any]) -> None:
    """Raise ValueError unless every file listed exists inside `folder` with its sha256, no unlisted file is
    present, and the files the graph block names (graph.file, graph.external_data) are among the hashed ones."""
    folder = Path(folder)
    listed = manifest.get("files")
    if not isinstance(listed, dict) or not listed:
        raise ValueError(f"{folder}/{MANIFEST_NAME} lists no files")
    for rel in listed:
        inside(folder, rel, "files[]")
    actual = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {MANIFEST_NAME}
    if extra := sorted(actual - set(listed)):
        raise ValueError(f"{folder} holds files the manifest does not list: {extra}")
    graph = manifest.get("graph")
    if not isinstance(graph, dict):
        raise ValueError(f"{folder}/{MANIFEST_NAME} has no graph block; re-export the model")
    used = {"graph.file": graph.get("file")}
    if graph.get("external_data") is not None:
        used["graph.external_data"] = graph["external_data"]
    for what, rel in used.items():
        inside(folder, rel, what)
        if Path(rel).as_posix() not in listed:
            raise ValueError(
                f"{folder}/{MANIFEST_NAME}: {what} {rel!r} is not among the hashed files[]; re-export the model"
            )
    for rel, entry in listed.items():
        path = folder / rel
        if not path.is_file():
            raise ValueError(f"{path} is listed in the manifest but missing: the export is incomplete")
        if not isinstance(entry, dict) or sha256_file(path) != entry.get("sha256"):
            raise ValueError(f"{path} does not match its sha256 in the manifest: the file changed after export")
