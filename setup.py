"""Build: the Python package from python/ + kernels/, and the C++ extension through CMake.

The extension (csrc/) is configured by CMakeLists.txt and built with ninja; set
DEEPENCODER_KERNELS_NO_EXT=1 to skip it (the ops then run on their other backends), and
DEEPENCODER_KERNELS_CUDA=1 to add the CUDA sources (needs nvcc; not a CUDA build of torch).
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = ["-G", "Ninja", f"-DCMAKE_BUILD_TYPE=Release", f"-DPython_EXECUTABLE={sys.executable}",
               f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", f"-DOUTPUT_DIR={out_dir}"]
        if os.environ.get("DEEPENCODER_KERNELS_CUDA") == "1":
            cfg.append("-DDEEPENCODER_KERNELS_CUDA=ON")
        cfg += os.environ.get("DEEPENCODER_KERNELS_CMAKE_ARGS", "").split()
        subprocess.run(["cmake", str(ROOT), *cfg], cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "-j", str(os.cpu_count() or 2)], cwd=build_dir, check=True)


HAS_SOURCES = any((ROOT / "csrc").glob("*.cpp"))
ext_modules = [] if os.environ.get("DEEPENCODER_KERNELS_NO_EXT") or not HAS_SOURCES else [CMakeExtension("deepencoder_kernels._C")]

setup(
    package_dir={"deepencoder_kernels": "python/deepencoder_kernels", "deepencoder_kernels.kernels": "kernels",
                 "deepencoder_kernels.csrc": "csrc"},
    packages=["deepencoder_kernels", "deepencoder_kernels.ops", "deepencoder_kernels.modules", "deepencoder_kernels.kernels",
              "deepencoder_kernels.csrc"],
    # the CUDA kernel source ships as data: the CuPy path compiles it with NVRTC at run time
    package_data={"deepencoder_kernels.csrc": ["*.h", "*.cuh"], "deepencoder_kernels.kernels": ["tuned/*.json"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": CMakeBuild},
)
