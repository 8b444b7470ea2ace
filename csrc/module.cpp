// deepencoder_kernels._C: the C++ extension's entry point (pybind11). Ops register here as they
// arrive; today it reports how it was built, so the build path (setup.py -> CMake -> ninja) is
// exercised by every install and CI run.
#include <pybind11/pybind11.h>

#include <string>

namespace py = pybind11;

namespace {

py::dict build_info() {
  py::dict info;
#if defined(__clang__)
  info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = std::string("gcc ") + __VERSION__;
#else
  info["compiler"] = "unknown";
#endif
#if defined(_OPENMP)
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["cplusplus"] = static_cast<long>(__cplusplus);
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "deepencoder-kernels C++ extension";
  m.def("build_info", &build_info, "How this extension was compiled: compiler, OpenMP, C++ standard.");
}
