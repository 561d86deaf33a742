"""ldmkit's own C kernels (``ldmkit/accel/csrc``): built with the system C compiler on first
use, cached, and loaded with ``ctypes``.

The kernels are plain C with CPU intrinsics and no PyTorch headers, so a build takes about a
second; the shared library is cached under ``$LDMKIT_CACHE_DIR`` (default
``~/.cache/ldmkit/native``), keyed by a hash of the source (with the shared headers in
``csrc``), the flags, the compiler and the CPU, and written atomically. ``LDMKIT_NATIVE=0``
turns every native kernel off (the callers then take their PyTorch path); so does a missing
or failing compiler, with one warning. Tracers cannot see into a C call, so the callers also
step aside inside ``torch.compile``/``torch.export`` and ``torch.jit.trace`` (``tracing``).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

SOURCES = Path(__file__).parent / "csrc"
_OFF = ("0", "false", "no", "off")


def enabled() -> bool:
    """False when ``LDMKIT_NATIVE`` is set to 0/false/no/off."""
    return os.environ.get("LDMKIT_NATIVE", "1").strip().lower() not in _OFF


def tracing() -> bool:
    """Inside ``torch.compile``/``torch.export`` or ``torch.jit.trace`` (OpenVINO's converter,
    the TorchScript ONNX exporter): a C call would be invisible to the graph, so callers take
    their PyTorch path."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd would have to differentiate through a call on ``tensors`` (None
    entries skipped): the C kernels have no backward, so callers then take their PyTorch
    path."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def cache_dir() -> Path:
    root = os.environ.get("LDMKIT_CACHE_DIR")
    if root:
        return Path(root) / "native"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "ldmkit" / "native"


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc) or cc
    return next((p for p in map(shutil.which, ("cc", "gcc", "clang")) if p), None)


@functools.cache
def _cpuinfo() -> tuple[str, ...]:
    """The "model name" and "flags" lines of /proc/cpuinfo (first CPU; empty without it)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ()
    return tuple(ln for ln in lines if ln.startswith(("model name", "flags")))[:2]


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags from /proc/cpuinfo (empty where that file does not exist)."""
    line = next((ln for ln in _cpuinfo() if ln.startswith("flags")), "flags:")
    return frozenset(line.split(":", 1)[1].split())


def _cpu_signature() -> bytes:
    """The CPU's model and feature flags (part of the cache key: ``-march=native`` builds must
    not be reused on another CPU through a shared home directory)."""
    return ("\n".join(_cpuinfo()) or platform.processor()).encode()


@functools.cache
def _compiler_version(cc: str) -> str:
    return subprocess.run([cc, "--version"], capture_output=True, text=True).stdout


def build(name: str, flags: Sequence[str]) -> Path:
    """Compiles ``csrc/<name>.c`` into a cached shared library (rebuilt only when the source,
    the flags, the compiler or the CPU change) and returns its path. Raises ``RuntimeError``
    with the compiler's output on failure."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    source = SOURCES / f"{name}.c"
    version = _compiler_version(cc)
    headers = [h.read_bytes() for h in sorted(source.parent.glob("*.h"))]  # shared includes
    parts = [source.read_bytes(), *headers, " ".join(flags).encode(), cc.encode(), version.encode()]
    parts.append(_cpu_signature())
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    target = cache_dir() / f"{name}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        cmd = [cc, "-shared", "-fPIC", *flags, str(source), "-o", tmp, "-lm"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr.strip()}")
        os.replace(tmp, target)  # atomic: concurrent builds of the same key are harmless
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.cache
def load(name: str, flags: tuple[str, ...]) -> ctypes.CDLL | None:
    """The built ``csrc/<name>.c`` as a ``ctypes.CDLL``, or None (with one warning) when
    native kernels are off or the build fails. Cached per process."""
    if not enabled():
        return None
    try:
        return ctypes.CDLL(str(build(name, flags)))
    except (RuntimeError, OSError) as err:
        warnings.warn(
            f"ldmkit: native kernel {name!r} unavailable, using the PyTorch path ({err})",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


def load_for_cpu(
    name: str, flags: tuple[str, ...], cpu: set[str], *, amx: bool = False
) -> ctypes.CDLL | None:
    """``load(name, flags)`` where this is an x86-64 CPU with every flag in ``cpu`` (as
    /proc/cpuinfo names them) and, with ``amx``, where Linux grants the process the AMX tile
    state (the kernel's ``ldm_amx_request``, from ``csrc/amx_common.h``); None elsewhere."""
    if platform.machine() not in ("x86_64", "AMD64") or not cpu.issubset(cpu_flags()):
        return None
    lib = load(name, flags)
    if lib is None or (amx and lib.ldm_amx_request() != 0):
        return None
    return lib
