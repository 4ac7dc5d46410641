// The linear layer's small-output kernels (forward, grad_x, grad_W) with 64-byte vectors (16 floats, 8 doubles),
// compiled for AVX-512 and taken where cpu_path() is avx512: the same source as the 256-bit build (see
// cpu/simd.h). x86-64 only.
#if defined(__x86_64__) || defined(__i386__)
#define FASTMNIST_VEC_BYTES 64
#include "cpu/linear_act.cpp"
#endif
