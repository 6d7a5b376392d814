"""Compiling a C++ source set into a torch extension library on first use, cached by content.

Every CPU library of this package (the decode kernels in cpu.py, the trellis searches beside them)
is a `CppLibrary`: its sources, its compiler flags and what the CPU must offer. The compiled file's
name hashes all of these with the compiler, torch and Python, so a changed source or a different
machine type never loads a stale build. Building is atomic: a failed or concurrent build leaves no
torn file. Nothing here imports the project: the caller chooses the build directory.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

BUILD_TIMEOUT_S = 600
BASE_FLAGS = ("-O3", "-std=c++20", "-fPIC", "-shared", "-fopenmp", "-DNDEBUG")


class KernelsUnavailable(RuntimeError):
    """A CPU library cannot run here; the message says why."""


def compiler() -> str:
    return os.environ.get("CXX", "g++")


def portable_flags() -> tuple[str, ...]:
    """Vector flags for code that any x86-64 CPU of this one's class runs: AVX2 and FMA where the
    CPU has them (AVX-512 CPUs included), the compiler's baseline otherwise."""
    if platform.machine() in ("x86_64", "AMD64") and \
            torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        return ("-mavx2", "-mfma", "-mf16c")
    return ()


PORTABLE_ENV = "TRELLIS_CPU_PORTABLE"  # set to 1: build without the CPU's optional extensions


@functools.lru_cache(maxsize=1)
def cpu_features() -> frozenset[str]:
    """The instruction-set extensions this CPU reports (Linux /proc/cpuinfo flag names), or none
    where the file is missing. Read once: every library's path asks for it."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


@dataclass(frozen=True)
class CppLibrary:
    """One compiled library: `name` is also its torch.ops namespace and its file's prefix.

    `optional_flags` pairs a CPU feature with the compiler flag that lets the sources use it
    (they test the compiler's macro, e.g. __AVX512VBMI2__): added where this CPU has the feature,
    since the library is compiled on the machine that runs it, unless TRELLIS_CPU_PORTABLE=1
    asks for a build that any CPU meeting the required flags runs.
    """

    name: str
    sources: tuple[Path, ...]
    headers: tuple[Path, ...] = ()
    flags: tuple[str, ...] = ()
    needs_avx512: bool = False
    optional_flags: tuple[tuple[str, str], ...] = ()

    def path(self, build_dir: Path) -> Path:
        """Where the library for these sources, flags, compiler, torch and Python is cached."""
        key = hashlib.sha256()
        for part in (*(f.read_bytes() for f in self.sources + self.headers), compiler().encode(),
                     " ".join(self.all_flags()).encode(), torch.__version__.encode(),
                     sys.version.encode(), platform.machine().encode()):
            key.update(part)
        return build_dir / f"{self.name}-{key.hexdigest()[:16]}.so"

    def all_flags(self) -> tuple[str, ...]:
        if os.environ.get(PORTABLE_ENV) == "1":
            return BASE_FLAGS + self.flags
        features = cpu_features()
        return BASE_FLAGS + self.flags + tuple(
            flag for feature, flag in self.optional_flags if feature in features)

    def check_cpu(self) -> None:
        """Raise KernelsUnavailable when this CPU cannot run the library."""
        if platform.machine() not in ("x86_64", "AMD64"):
            raise KernelsUnavailable(f"the CPU kernels need x86-64, not {platform.machine()}")
        capability = torch.backends.cpu.get_cpu_capability()
        if self.needs_avx512 and capability != "AVX512":
            raise KernelsUnavailable(f"the CPU kernels need AVX-512; this CPU offers {capability}")

    def build(self, target: Path) -> None:
        """Compile the sources into `target`, atomically, and remove builds of older sources."""
        from torch.utils.cpp_extension import include_paths, library_paths

        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as work:
            partial = Path(work) / target.name
            command = [compiler(), *self.all_flags(), *(f"-I{p}" for p in include_paths()),
                       *map(str, self.sources), "-o", str(partial),
                       *(f"-L{p}" for p in library_paths()),
                       *(f"-Wl,-rpath,{p}" for p in library_paths()), "-lc10", "-ltorch_cpu"]
            try:
                result = subprocess.run(command, capture_output=True, text=True,
                                        timeout=BUILD_TIMEOUT_S)
            except FileNotFoundError:
                raise KernelsUnavailable(f"no C++ compiler: {compiler()!r} was not found") from None
            except subprocess.TimeoutExpired:
                raise KernelsUnavailable(
                    f"compiling {self.name} took over {BUILD_TIMEOUT_S} s") from None
            if result.returncode != 0:
                errors = [line for line in result.stderr.splitlines() if "error" in line]
                raise KernelsUnavailable(f"compiling {self.name} failed: "
                                         f"{(errors or result.stderr.splitlines() or ['?'])[0]}")
            os.replace(partial, target)
        for stale in target.parent.glob(f"{self.name}-*.so"):
            if stale != target:
                stale.unlink(missing_ok=True)


_loaded: dict[str, str] = {}  # library name -> path loaded into this process


def load(library: CppLibrary, build_dir: Path) -> None:
    """Make torch.ops.<library.name> available in this process, compiling into build_dir if needed."""
    if library.name in _loaded:
        return
    library.check_cpu()
    target = library.path(build_dir)
    if not target.exists():
        library.build(target)
    torch.ops.load_library(str(target))
    _loaded[library.name] = str(target)
