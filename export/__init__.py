"""vzedge.export: imported as `vzedge.export`, never as the bare folder name."""

if __name__ != "vzedge.export":
    raise ImportError(
        f"the {__name__!r} folder is the vzedge.export package: install vzedge (pip install -e .) "
        "and import vzedge.export"
    )
