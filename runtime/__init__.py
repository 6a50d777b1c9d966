"""vzedge.runtime: imported as `vzedge.runtime`, never as the bare folder name."""

if __name__ != "vzedge.runtime":
    raise ImportError(
        f"the {__name__!r} folder is the vzedge.runtime package: install vzedge (pip install -e .) "
        "and import vzedge.runtime"
    )
