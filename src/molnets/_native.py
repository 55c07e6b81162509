"""Optional compiled CPU kernels (private): ``_native.c``, compiled at first use.

Some kernels of the frozen-weight fast paths are a few loops over contiguous channels whose
PyTorch form is a chain of gathers, products and sums, each a full pass over memory and a
dispatch: the pair convolution (``layers._message_kernels.native_convolution``), the scatter of
outer products (``layers._scatter_outer_kernels.native_scatter_outer``), the TensorNet-style
3x3 products (``models._tensornet_ops._native_products``) and the ACE product basis, whose
folded weights are ~93% structural zeros (``_ace_kernel.NativeProductBasis``). ``_native.c``
holds them as plain C (no PyTorch headers: it compiles in a fraction of a second); they are
called through ``ctypes`` on the data of contiguous CPU tensors. Where they cannot run the PyTorch operations run, which stay the
definition and the tests' oracle: nothing about a model's results depends on a compiler.

At the first call ``library()`` compiles ``_native.c`` with the C compiler of ``$CC`` or ``cc``
(``-O3 -march=native -fopenmp``, then without ``-march=native``, then without OpenMP) into
``$MOLNETS_CACHE_DIR`` (default ``$XDG_CACHE_HOME/molnets`` or ``~/.cache/molnets``), under a
name that hashes the source, the flags, the compiler and the CPU (a home directory shared by
machines of different CPUs keeps one library per CPU), written to a temporary file and renamed
(two processes compiling at once leave one whole library). OpenMP's runtime is the one PyTorch
has loaded (the same ``libgomp.so.1``), so the kernels' threads are PyTorch's.
``MOLNETS_NATIVE=0`` turns them off. A failed compilation warns once and the PyTorch
operations run.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._frozen import traced

__all__ = ["applies", "available", "library", "call"]

SOURCE = Path(__file__).with_name("_native.c")

# tried in turn until one compiles
FLAG_SETS: Tuple[Tuple[str, ...], ...] = (
    ("-O3", "-march=native", "-fopenmp"),
    ("-O3", "-fopenmp"),
    ("-O3",),
)

# argument kinds of every kernel: p a tensor's data pointer, i a 64-bit integer, n an int
# (the number of threads), by kernel name without its dtype suffix
SIGNATURES: Dict[str, str] = {
    "pair_convolution_forward": "pppppp" + "iiiii" + "n",
    "pair_convolution_backward": "pppppppp" + "iiiii" + "n",
    "scatter_outer_forward": "ppppp" + "iiiii" + "n",
    "scatter_outer_backward": "ppppppp" + "iiiii" + "n",
    "matrix_products": "pppp" + "iiiiiiii" + "n",
    "product_basis_forward": "pppppppp" + "iiiiiii" + "n",
    "product_basis_backward": "ppppppppp" + "iiiiiii" + "n",
}

_CTYPES = {"p": ctypes.c_void_p, "i": ctypes.c_int64, "n": ctypes.c_int}

_lock = threading.Lock()
_state: Dict[str, object] = {}  # "library": the loaded CDLL or None once tried


def applies(*tensors: Tensor) -> bool:
    """Whether the kernels run on ``tensors``: on the CPU, all float32 or all float64, eager
    (neither ``torch.compile``, ``torch.export`` nor a ``torch.func`` transform tracing: their
    tensors have no data), and compiled here. Flags only (~1 µs: it is asked at every call)."""
    dtype = tensors[0].dtype
    if dtype not in _SUFFIXES or not available():
        return False
    for t in tensors:
        if not t.is_cpu or t.dtype is not dtype:
            return False
    return not traced()


_SUFFIXES = {torch.float32: "f32", torch.float64: "f64"}


def available() -> bool:
    """Whether the compiled kernels can run (compiling them now if not tried yet)."""
    return library() is not None


def library() -> Optional[ctypes.CDLL]:
    """The loaded kernels, or None (turned off, no compiler, or it failed: warned once)."""
    if "library" not in _state:
        with _lock:
            if "library" not in _state:
                _state["library"] = _load()
    return _state["library"]  # type: ignore[return-value]


_functions: Dict[Tuple[ctypes.CDLL, str, torch.dtype], Any] = {}


def call(name: str, like: Tensor, *args: object) -> None:
    """Run kernel ``name`` for ``like``'s dtype on ``args`` (tensors, contiguous and on the CPU,
    given by their data; None for a null pointer; ints), with PyTorch's number of threads.
    Raises when the kernel finds an index out of range or cannot allocate its buffers."""
    lib, dtype = library(), like.dtype
    function = _functions.get((lib, name, dtype))
    if function is None:
        function = _functions[(lib, name, dtype)] = getattr(lib, f"{name}_{_SUFFIXES[dtype]}")
    values = []
    for a in args:
        if isinstance(a, Tensor):
            if not (a.is_cpu and a.is_contiguous() and (a.dtype is dtype or a.dtype is torch.int64)):
                raise TypeError(f"molnets native kernel {name}: needs contiguous CPU tensors of {dtype} "
                                f"and int64, got {a.dtype} {tuple(a.shape)} on {a.device}")
            a = a.data_ptr()
        values.append(a)
    status = function(*values, torch.get_num_threads())
    if status == 1:
        raise IndexError(f"molnets native kernel {name}: an index (atom, pair, species or component) is out of range")
    if status != 0:
        raise MemoryError(f"molnets native kernel {name}: could not allocate its buffers")


def _load() -> Optional[ctypes.CDLL]:
    if os.environ.get("MOLNETS_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        return None
    errors = []
    for flags in FLAG_SETS:
        path = _cache_dir() / f"molnets-native-{_key(compiler, flags)}.so"
        try:
            if not path.exists():
                _compile(compiler, flags, path)
            return _bind(ctypes.CDLL(str(path)))
        except (OSError, subprocess.SubprocessError) as error:
            errors.append(f"{compiler} {' '.join(flags)}: {str(error)[-500:]}")
    warnings.warn("molnets: the compiled CPU kernels could not be built; the PyTorch operations run instead "
                  "(set MOLNETS_NATIVE=0 to skip trying).\n" + "\n".join(errors), RuntimeWarning, stacklevel=3)
    return None


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    for name, kinds in SIGNATURES.items():
        for suffix in _SUFFIXES.values():
            function = getattr(lib, f"{name}_{suffix}")
            function.argtypes = [_CTYPES[k] for k in kinds]
            function.restype = ctypes.c_int
    return lib


def _compile(compiler: str, flags: Sequence[str], path: Path) -> None:
    """Compile ``SOURCE`` into ``path`` through a temporary file in its directory, renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *flags, "-shared", "-fPIC", "-o", temporary, str(SOURCE)],
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise subprocess.SubprocessError(done.stderr.strip() or f"exit status {done.returncode}")
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _cache_dir() -> Path:
    """``$MOLNETS_CACHE_DIR``, else ``$XDG_CACHE_HOME/molnets`` or ``~/.cache/molnets``; where that
    cannot be written (a read-only home on a compute node), a folder of this user's in the
    temporary directory."""
    if os.environ.get("MOLNETS_CACHE_DIR"):
        return Path(os.environ["MOLNETS_CACHE_DIR"])
    folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "molnets"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if os.access(folder, os.W_OK):
            return folder
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / f"molnets-{getattr(os, 'getuid', lambda: 'user')()}"


def _key(compiler: str, flags: Sequence[str]) -> str:
    """A hash of what the compiled library depends on: source, flags, compiler, CPU."""
    digest = hashlib.sha256(SOURCE.read_bytes())
    for part in (*flags, compiler, platform.machine(), _cpu_model()):
        digest.update(b"\0" + part.encode())
    return digest.hexdigest()[:16]


def _cpu_model() -> str:
    """The CPU's model and instruction-set flags (``-march=native`` depends on them)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            first = cpuinfo.read().split("\n\n")[0]
    except OSError:
        return platform.processor()
    return "\n".join(line for line in first.splitlines() if line.startswith(("model name", "flags", "Features")))
