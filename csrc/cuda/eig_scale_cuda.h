#pragma once
#include <cstdint>

namespace kronlin {

// CUDA twin of eig_scale_cpu (called by csrc/bindings_cuda.cpp after it has
// checked every operand): pointers are device pointers to C-contiguous
// arrays Y (B, q, p), lg (B, q), la (B, p) of float (is_double = false) or
// double; the launch goes on `stream` (a cudaStream_t as an integer, 0 for
// the legacy default stream).  Throws std::runtime_error on a CUDA error.
void eig_scale_cuda(void* Y, const void* lg, const void* la, std::int64_t B, std::int64_t q,
                    std::int64_t p, double shift, double power, bool is_double, std::uintptr_t stream);

}  // namespace kronlin
