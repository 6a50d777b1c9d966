"""Device profiles as data: the built-in `vzedge/devices/*.toml`, merged with a user's file."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

GIB = 1024**3
HOST = "host"  # the machine at hand, built from /proc/meminfo (for --validate)
_FIELDS = ("name", "memory_gib", "unified", "bandwidth_gbs", "fp16_tflops", "reserve_gib", "cuda_context_gib")


@dataclass(frozen=True)
class DeviceProfile:
    """One device. Throughput figures may be None (the host CPU): the bounds are then left out."""

    id: str
    name: str
    memory_gib: float
    unified: bool
    bandwidth_gbs: float | None
    fp16_tflops: float | None
    reserve_gib: float
    cuda_context_gib: float
    dla_cores: int = 0
    notes: str = ""
    sources: tuple[str, ...] = field(default_factory=tuple)
    cuda: bool = True  # False only for the host profile of a machine without CUDA

    def __post_init__(self) -> None:
        if self.memory_gib <= 0:
            raise ValueError(f"device {self.id!r}: memory_gib must be > 0, got {self.memory_gib}")
        if self.reserve_gib < 0 or self.cuda_context_gib < 0:
            raise ValueError(f"device {self.id!r}: reserve_gib and cuda_context_gib must be >= 0")
        if self.reserve_gib >= self.memory_gib:
            raise ValueError(
                f"device {self.id!r}: reserve_gib {self.reserve_gib} leaves no memory of {self.memory_gib}"
            )
        for name in ("bandwidth_gbs", "fp16_tflops"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"device {self.id!r}: {name} must be > 0 (or left out), got {value}")

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GIB)

    @property
    def available_bytes(self) -> int:
        """What a process may use: memory less the OS/firmware reserve."""
        return int((self.memory_gib - self.reserve_gib) * GIB)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sources"] = list(self.sources)
        return d


def _toml_loads(text: str, where: str) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError as err:
            raise ImportError(
                f"reading {where} needs a TOML parser: Python >= 3.11 has one; on 3.10 pip install tomli"
            ) from err
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{where} is not valid TOML: {err}") from err


def _parse(text: str, where: str) -> dict[str, DeviceProfile]:
    data = _toml_loads(text, where)
    entries = data.get("device")
    if not isinstance(entries, list):
        raise ValueError(f"{where} has no [[device]] tables; see vzedge/devices/jetson.toml for the format")
    out: dict[str, DeviceProfile] = {}
    for i, entry in enumerate(entries):
        ident = entry.get("id")
        if not ident:
            raise ValueError(f"{where}: [[device]] number {i + 1} has no id")
        missing = [k for k in _FIELDS if k not in entry]
        if missing:
            raise ValueError(f"{where}: device {ident!r} lacks {', '.join(missing)}")
        known = {*_FIELDS, "id", "dla_cores", "notes", "sources"}
        unknown = sorted(set(entry) - known)
        if unknown:
            raise ValueError(f"{where}: device {ident!r} has unknown fields {unknown}; known: {sorted(known)}")
        try:
            out[ident] = DeviceProfile(
                id=ident,
                name=str(entry["name"]),
                memory_gib=float(entry["memory_gib"]),
                unified=bool(entry["unified"]),
                bandwidth_gbs=float(entry["bandwidth_gbs"]),
                fp16_tflops=float(entry["fp16_tflops"]),
                reserve_gib=float(entry["reserve_gib"]),
                cuda_context_gib=float(entry["cuda_context_gib"]),
                dla_cores=int(entry.get("dla_cores", 0)),
                notes=str(entry.get("notes", "")),
                sources=tuple(entry.get("sources", ())),
            )
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: device {ident!r}: {err}") from err
    return out


def builtin_devices() -> dict[str, DeviceProfile]:
    out: dict[str, DeviceProfile] = {}
    folder = resources.files("vzedge") / "devices"
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".toml"):
            out.update(_parse(entry.read_text(encoding="utf-8"), f"vzedge/devices/{entry.name}"))
    return out


def load_devices(extra: str | os.PathLike[str] | None = None) -> dict[str, DeviceProfile]:
    """Built-in profiles, with those of `extra` (a TOML file of [[device]] tables) added or replacing."""
    devices = builtin_devices()
    if extra is not None:
        path = Path(extra)
        if not path.is_file():
            raise ValueError(f"--devices {str(path)!r} is not a file; pass a TOML file of [[device]] tables")
        devices.update(_parse(path.read_text(encoding="utf-8"), str(path)))
    return devices


def host_profile() -> DeviceProfile:
    """The machine at hand: total RAM from /proc/meminfo; no throughput figures (no bounds)."""
    import torch

    total = 0
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    total = int(line.split()[1]) * 1024
    except OSError:
        total = 0
    cuda = torch.cuda.is_available()
    if cuda:
        total = torch.cuda.get_device_properties(0).total_memory
    if total <= 0:
        raise ValueError("cannot read this machine's memory size; pass --device with a known profile")
    name = torch.cuda.get_device_name(0) if cuda else "this machine's CPU"
    return DeviceProfile(
        id=HOST,
        name=name,
        memory_gib=total / GIB,
        unified=not cuda,
        bandwidth_gbs=None,
        fp16_tflops=None,
        reserve_gib=0.0,
        cuda_context_gib=0.0,
        notes="built at run time; no throughput figures, so no bounds",
        cuda=cuda,
    )


def get_device(ident: str, extra: str | os.PathLike[str] | None = None) -> DeviceProfile:
    """The profile named `ident` ('host' is the machine at hand); a ValueError lists the known ones."""
    if ident == HOST:
        return host_profile()
    devices = load_devices(extra)
    if ident not in devices:
        raise ValueError(f"unknown device {ident!r}; known devices: {', '.join(sorted(devices))}, {HOST}")
    return devices[ident]
