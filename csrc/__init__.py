"""The C++/CUDA sources. Packaged so the CuPy path can compile the CUDA kernels with NVRTC at run time."""
