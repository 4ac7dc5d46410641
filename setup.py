"""Build script for fastmnist's compiled extension.

The C++ (CPU) kernels are always built. The CUDA kernels are built when the installed torch has CUDA and nvcc
is found, or when FASTMNIST_FORCE_CUDA=1 (for example to compile-check them on a machine with no GPU);
FASTMNIST_FORCE_CUDA=0 turns them off. The build prints what it decided and why.

The extension links against the torch it is compiled with, so it must be the torch that will run it:
install with `pip install --no-build-isolation .` (pip's isolated build environment would bring its own torch).
"""

import glob
import os
import shutil
import sys

from setuptools import find_namespace_packages, setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:
    sys.exit(
        "fastmnist: torch is not importable by this build. fastmnist compiles against the torch you run it "
        "with, so pip's isolated build environment (which would bring a different torch) is refused.\n"
        "Install torch first, then: pip install --no-build-isolation .   (or -e . for development)"
    )

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGE = "fastmnist"


def log(message):
    print(f"fastmnist build: {message}", file=sys.stderr, flush=True)


def find_cuda_home():
    """The CUDA toolkit: torch's own finding (only made for CUDA builds of torch), else $CUDA_HOME / $CUDA_PATH,
    /usr/local/cuda, or the folder above the nvcc on PATH. None when there is no nvcc."""
    candidates = [cpp_extension.CUDA_HOME, os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in candidates:
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return home
    return None


def want_cuda():
    """Decide whether to compile the CUDA kernels, and say why."""
    forced = os.environ.get("FASTMNIST_FORCE_CUDA")
    if forced == "0":
        return False, "FASTMNIST_FORCE_CUDA=0"
    cuda_home = find_cuda_home()
    if cuda_home is None:
        if forced == "1":
            sys.exit("fastmnist build: FASTMNIST_FORCE_CUDA=1 but no CUDA toolkit was found (looked at CUDA_HOME, "
                     "CUDA_PATH, /usr/local/cuda and nvcc on PATH); set CUDA_HOME to the toolkit's folder")
        return False, "no CUDA toolkit (nvcc) found"
    if forced == "1":
        # cpp_extension.CUDAExtension reads its module-level CUDA_HOME, which a CPU torch leaves at None
        cpp_extension.CUDA_HOME = cuda_home
        note = "" if torch.version.cuda else " (torch is a CPU build: expect the link to fail; " \
            "tools/check_cuda_compile.sh is the compile check for such machines)"
        return True, f"FASTMNIST_FORCE_CUDA=1, nvcc in {cuda_home}{note}"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU build (set FASTMNIST_FORCE_CUDA=1 to compile anyway)"
    if cpp_extension.CUDA_HOME is None:
        cpp_extension.CUDA_HOME = cuda_home
    return True, f"torch {torch.__version__} has CUDA {torch.version.cuda} and nvcc is in {cuda_home}"


def write_build_info(with_cuda):
    """Record the torch this extension is compiled against; fastmnist checks it at import."""
    path = os.path.join(HERE, PACKAGE, "_build_info.py")
    with open(path, "w") as f:
        f.write("# Written by setup.py at build time.\n")
        f.write(f"TORCH_VERSION = {torch.__version__!r}\n")
        f.write(f"WITH_CUDA = {with_cuda!r}\n")


def extensions():
    with_cuda, why = want_cuda()
    log(f"CUDA kernels {'ON' if with_cuda else 'OFF'} ({why})")
    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        # cpp_extension would query the visible GPU; with none it fails, so give a sensible default list.
        if not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
            log("TORCH_CUDA_ARCH_LIST unset and no GPU visible: building for 8.0;9.0")
    debug = os.environ.get("FASTMNIST_DEBUG") == "1"
    sanitize = os.environ.get("FASTMNIST_SANITIZE") == "1"
    # FASTMNIST_CPU_OPT=0 builds the C++ kernels at -O0 (the LeNet block's file: ~25 s instead of ~5 min), for
    # builds in which they only serve as the CUDA tests' reference (tools/gpu_verify.sh on a lent GPU machine).
    cpu_opt = os.environ.get("FASTMNIST_CPU_OPT", "3")
    if cpu_opt not in ("0", "1", "2", "3"):
        sys.exit(f"fastmnist build: FASTMNIST_CPU_OPT must be 0, 1, 2 or 3, got {cpu_opt!r}")
    # -O0 under the sanitizers: at -O1 the LeNet kernels' template variants take over 15 CPU-minutes to build
    optimization = "-O0" if sanitize else "-O1" if debug else f"-O{cpu_opt}"
    cxx_flags = [optimization, "-std=c++20", "-fopenmp", "-fno-math-errno", "-Wall", "-Wno-unused-function",
                 "-Wno-psabi"]
    link_flags = ["-fopenmp"]
    if debug or sanitize:
        cxx_flags += ["-g", "-fno-omit-frame-pointer"]
    if sanitize:
        cxx_flags += ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]
        link_flags += ["-fsanitize=address,undefined"]
    log(f"C++ flags: {' '.join(cxx_flags)}")
    write_build_info(with_cuda)

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp"))
                     + glob.glob(os.path.join("csrc", "cpu", "avx512", "*.cpp")))
    extra_compile_args = {"cxx": cxx_flags}
    define_macros = []
    if with_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        extra_compile_args["nvcc"] = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
        define_macros.append(("FASTMNIST_WITH_CUDA", None))
        extension = cpp_extension.CUDAExtension
    else:
        extension = cpp_extension.CppExtension
    return [
        extension(
            f"{PACKAGE}._C",
            sources,
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args=extra_compile_args,
            extra_link_args=link_flags,
            define_macros=define_macros,
        )
    ]


setup(
    packages=find_namespace_packages(include=[PACKAGE, f"{PACKAGE}.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
