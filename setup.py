"""Build driver: CMake (Ninja) compiles csrc/ into ``iic_ext/_C``.

Environment switches:
    IIC_EXT_CUDA=0/1      force the CUDA kernels off/on (default: on when torch has CUDA and nvcc is found)
    TORCH_CUDA_ARCH_LIST  CUDA architectures, e.g. "8.0;9.0" (default "8.0;9.0")
    MAX_JOBS              parallel compile jobs
    DEBUG=1               debug build
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent

try:
    import torch
    import torch.utils
except ImportError:
    sys.exit(
        "iic_ext compiles against your installed torch, which was not found in this build environment: "
        "run `pip install torch` first, then `pip install --no-build-isolation .`"
    )


def _find_nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return Path(home) / "bin" / "nvcc"
    nvcc = shutil.which("nvcc")
    if nvcc:
        return Path(nvcc)
    default = Path("/usr/local/cuda/bin/nvcc")
    return default if default.exists() else None


def _find_nvrtc(cuda_home):
    """libnvrtc for torch's CMake config, which links it: None when the toolkit has it, else the copy
    the torch wheel ships (minimal toolkits lack it)."""
    for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
        if (cuda_home / sub / "libnvrtc.so").exists():
            return None
    wheel_libs = Path(torch.__file__).resolve().parent.parent / "nvidia"
    hits = sorted(p for p in wheel_libs.glob("**/libnvrtc.so*") if "builtins" not in p.name and ".alt." not in p.name)
    return hits[0] if hits else None


def _cmake():
    """This environment's cmake (pip's, next to the interpreter) before the one on PATH: an old system
    CMake lacks nvcc's C++20 flags."""
    return shutil.which("cmake", path=str(Path(sys.executable).parent)) or "cmake"


def _toolkit_root(nvcc):
    """The CUDA toolkit holding ``nvcc``: CUDA_HOME if set, else the first candidate with both nvcc and
    the runtime headers (an nvcc on PATH may be a wrapper script outside the toolkit)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), nvcc.resolve().parent.parent,
                  "/usr/local/cuda"]
    for cand in candidates:
        if cand and (Path(cand) / "bin" / "nvcc").exists() and (Path(cand) / "include" / "cuda_runtime.h").exists():
            return Path(cand).resolve()
    return nvcc.resolve().parent.parent


def _want_cuda():
    flag = os.environ.get("IIC_EXT_CUDA")
    nvcc = _find_nvcc()
    if flag is not None and flag.strip() not in ("", "auto"):
        on = flag.strip().lower() in ("1", "on", "true", "yes")
        if on and torch.version.cuda is None:
            sys.exit("IIC_EXT_CUDA=1 but the installed torch has no CUDA support")
        if on and nvcc is None:
            sys.exit("IIC_EXT_CUDA=1 but nvcc was not found (set CUDA_HOME to the toolkit root)")
        return on, nvcc
    return (torch.version.cuda is not None and nvcc is not None), nvcc


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        cuda, nvcc = _want_cuda()
        # one CMake tree per torch build and backend choice: a cache made for another torch is stale
        flavour = f"{torch.__version__}-{'cuda' if cuda else 'cpu'}".replace("+", "_")
        build_dir = Path(self.build_temp).resolve() / f"cmake-{flavour}"
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = "Debug" if os.environ.get("DEBUG", "0") == "1" else "Release"
        args = [
            f"-S{ROOT}",
            f"-B{build_dir}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DIIC_EXT_OUTPUT_DIR={out.parent}",
            f"-DIIC_EXT_OUTPUT_NAME={out.name}",
            f"-DIIC_EXT_CUDA={'ON' if cuda else 'OFF'}",
        ]
        if shutil.which("ninja"):
            args.append("-GNinja")
        if cuda:
            cuda_home = _toolkit_root(nvcc)
            nvcc = cuda_home / "bin" / "nvcc"
            archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
            cmake_archs = ";".join(a.replace(".", "").replace("+PTX", "") for a in archs.replace(" ", ";").split(";") if a)
            args += [
                f"-DCMAKE_CUDA_COMPILER={nvcc}",
                f"-DCUDAToolkit_ROOT={cuda_home}",
                # torch's CMake config also runs the legacy FindCUDA, which would otherwise guess the
                # root from the nvcc on PATH
                f"-DCUDA_TOOLKIT_ROOT_DIR={cuda_home}",
                f"-DCMAKE_CUDA_ARCHITECTURES={cmake_archs}",
            ]
            nvrtc = _find_nvrtc(cuda_home)
            if nvrtc is not None:
                args.append(f"-DCUDA_nvrtc_LIBRARY={nvrtc}")
            os.environ.setdefault("CUDA_HOME", str(cuda_home))
            os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        print(f"iic_ext: building {'CPU + CUDA' if cuda else 'CPU'} kernels against torch {torch.__version__}")
        subprocess.check_call([_cmake(), *args])
        build = [_cmake(), "--build", str(build_dir), "--config", cfg]
        jobs = os.environ.get("MAX_JOBS")
        if jobs:
            build += ["--parallel", jobs]
        subprocess.check_call(build)
        # A checkout used in place (scripts, benchmarks run from the repository root) imports the
        # source folder ahead of site-packages; give it the same library so it never runs without it.
        src_copy = ROOT / "iic_ext" / out.name
        if src_copy.resolve() != out and (ROOT / "iic_ext").is_dir():
            # a new file renamed over the old one: a process that has the old library loaded keeps
            # its mapping (copying over it in place would change code under a running program)
            tmp = src_copy.with_name(src_copy.name + ".tmp")
            try:
                shutil.copy2(out, tmp)
                os.replace(tmp, src_copy)
            except OSError:
                tmp.unlink(missing_ok=True)


setup(
    ext_modules=[CMakeExtension("iic_ext._C")],
    cmdclass={"build_ext": CMakeBuild},
)
