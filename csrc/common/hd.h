// KRONLIN_HD: marks the shared math of a kernel family as callable from host
// and device code (CUDA) or as plain inline functions (C++).  Included by
// every header under csrc/common/.
#pragma once

#if defined(__CUDACC__)
#define KRONLIN_HD __host__ __device__ __forceinline__
#else
#define KRONLIN_HD inline
#endif
