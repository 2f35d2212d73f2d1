"""Build and load the CPU platform's C kernels at run time.

The kernels (``kernels/*.c``) are plain C with OpenMP, compiled on first use by
the machine's C compiler with ``-march=native`` and the model's geometry as
constants, then loaded with ctypes. Nothing is compiled at install time, so the
package stays pure Python; machines without a compiler fall back to the torch
backend (``CpuSdpaAttentionBackend``), and the reason is in the backend log.

Why not torch.utils.cpp_extension: including the torch headers makes each
build take tens of seconds; these kernels only need raw pointers.

The library links ``libgomp.so.1`` by soname, which torch (imported first)
has already loaded, so the kernels run on torch's OpenMP threads and obey
``torch.set_num_threads``.

Builds are cached in ``$BACKPLANE_CACHE_DIR/cpu_kernels`` (default
``~/.cache/backplane``) under a hash of the source, the flags, the compiler
and the CPU's feature flags, and published with an atomic rename so that
concurrent processes never load a half-written file.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

KERNEL_DIR = Path(__file__).with_name("kernels")
_BASE_FLAGS = (
    "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC",
    # A misspelt intrinsic or macro must fail the build, not the dlopen later.
    "-Werror=implicit-function-declaration",
    # Enough freedom to vectorise the max/sum reductions, without -ffast-math
    # (whose crtfastmath would turn on flush-to-zero for the whole process).
    "-fno-math-errno", "-fno-trapping-math", "-fassociative-math", "-fno-signed-zeros",
    # No implicit multiply-add fusing: gcc fused a row scale and bias into one FMA
    # in the one-row copy of an inlined GEMM tile and not in the others, so a
    # row's W8A16 result depended on its batch. Loops that want FMAs use MULADD
    # (common.h) or the intrinsics.
    "-ffp-contract=off",
    # gcc tunes Zen 4 and others for 256-bit vectors; the kernels' loops want 512.
    *(("-mprefer-vector-width=512",) if platform.machine().lower() in ("x86_64", "amd64")
      else ()),
)


class KernelBuildError(RuntimeError):
    """The C compiler is missing or refused the kernel; the message says which."""


def cache_dir() -> Path:
    root = os.environ.get("BACKPLANE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "backplane")
    return Path(root) / "cpu_kernels"


def compiler() -> str | None:
    """The C compiler to use: $CC, else cc/gcc/clang on PATH."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


@functools.lru_cache(maxsize=1)
def _machine_fingerprint(cc: str) -> str:
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True,
                                 timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise KernelBuildError(f"C compiler {cc!r} did not run: {exc}") from exc
    try:  # -march=native code must not be reused on a CPU with other features
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith(("flags", "Features")))
    except (OSError, StopIteration):
        flags = ""
    return version + flags


def _writable(directory: Path) -> bool:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(directory, os.W_OK)


@functools.lru_cache(maxsize=None)
def load_kernel(source: str, defines: tuple[tuple[str, int], ...]) -> ctypes.CDLL:
    """Compile (or reuse) ``kernels/<source>`` with ``defines`` and load it.

    Raises KernelBuildError naming the compiler and its output on failure.
    """
    cc = compiler()
    if cc is None:
        raise KernelBuildError("no C compiler found (set CC, or install gcc or clang)")
    # The source and every header it may include decide the build.
    text = b"".join(path.read_bytes() for path in
                    [KERNEL_DIR / source, *sorted(KERNEL_DIR.glob("*.h"))])
    flags = [*_BASE_FLAGS, f"-I{KERNEL_DIR}", *(f"-D{name}={value}" for name, value in defines)]
    key = hashlib.sha256(text + "\0".join(flags).encode() + _machine_fingerprint(cc).encode())
    target = cache_dir() / f"{Path(source).stem}-{key.hexdigest()[:20]}.so"
    if not target.exists() and not _writable(target.parent):
        # read-only home (some containers): build under the temp dir instead
        target = Path(tempfile.gettempdir()) / f"backplane-{os.getuid()}" / target.name
        target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        cmd = [cc, *flags, str(KERNEL_DIR / source), "-o", tmp]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as exc:
            os.unlink(tmp)
            raise KernelBuildError(f"{' '.join(cmd)} failed to run: {exc}") from exc
        if done.returncode != 0:
            os.unlink(tmp)
            raise KernelBuildError(
                f"{' '.join(cmd)} exited with {done.returncode}: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
        logger.info("cpu platform: compiled %s (%s) -> %s", source,
                    " ".join(f"{k}={v}" for k, v in defines), target)
    return ctypes.CDLL(str(target))


def load_gemm_kernel(source: str, isa: str | None,
                     defines: tuple[tuple[str, int], ...] = ()) -> ctypes.CDLL:
    """``kernels/<source>`` as `load_kernel` builds it (with ``defines``), with its AMX
    tile code for ``isa == "amx"`` (BACKPLANE_AMX=1), after asking Linux for this
    process's tile state (``amx_enable``; kernels before 5.16 refuse, which raises
    KernelBuildError)."""
    if isa != "amx":
        return load_kernel(source, defines)
    lib = load_kernel(source, (*defines, ("BACKPLANE_AMX", 1)))
    lib.amx_enable.restype = ctypes.c_int
    if lib.amx_enable() != 0:
        raise KernelBuildError("Linux refused this process the AMX tile state "
                               "(arch_prctl ARCH_REQ_XCOMP_PERM)")
    return lib


def check_status(status: int | None, kernel: str) -> None:
    """Raise MemoryError for a kernel that returned -1 (its scratch memory could not be
    allocated)."""
    if status:
        raise MemoryError(f"cpu platform: the {kernel} could not allocate its scratch memory")
