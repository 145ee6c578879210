// The CUDA emulator, kernel side: what train_gpt.cu's CUDA sections see when they are compiled by the
// host compiler with -DPGOLF_EMU (tests only; never part of ./train_gpt or of the submission).
//
// Every CUDA thread of a block runs as a fiber (tests/emu/emu_runtime.cpp); __syncthreads, the warp
// collectives, ldmatrix, mma.sync and cp.async are collective operations that complete only when
// every lane they name has arrived. Blocks run one after another in a seeded random order, the threads
// of a block in a seeded random interleaving (PGOLF_EMU_SEED). Shared memory accesses are checked for
// races and uninitialized reads through the compiler's load/store callbacks (clang's
// -fsanitize-coverage=trace-loads,trace-stores), global memory by AddressSanitizer.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include "emu_contract.h"

// --- CUDA C++ keywords as host C++ -----------------------------------------------------------------
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#undef threadIdx
#undef blockIdx
#undef blockDim
#undef gridDim
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Static shared arrays live in one section; the runtime knows its bounds ([__start_emu_shared,
// __stop_emu_shared)), fills it with a NaN pattern at every block start and watches every access.
#define __shared__ __attribute__((section("emu_shared"), aligned(16))) static

namespace emu {
extern uint3 g_threadIdx, g_blockIdx;
extern dim3 g_blockDim, g_gridDim;
void* dynamic_shared();
void syncthreads();
void syncwarp(unsigned mask);
uint64_t shfl_xor(unsigned mask, uint64_t bits, int lane_mask, int width);
void ldmatrix_x4(uint32_t r[4], const void* p, bool trans);
void mma_bf16_16816(float d[4], const uint32_t a[4], uint32_t b0, uint32_t b1);
void cp_async_16(void* dst, const void* src, bool valid);
void cp_async_commit();
void cp_async_wait(int n);

// the launch limits of sm_90a (default, or PGOLF_EMU_ARCH), sm_90, sm_89, sm_86, sm_80
void set_target(const char* arch);
const char* target_name();
size_t allocated_bytes();            // what cudaMalloc holds now
size_t host_allocated_bytes();       // what cudaMallocHost holds now (page-locked)
long graph_execs();                  // instantiated graphs not yet destroyed

// The launches, memsets, copies, cuBLASLt matmuls and NCCL collectives issued since the last reset.
inline const EmuCounts& counts() { return emu_counts(); }
inline void reset_counts() { emu_counts() = EmuCounts(); }

struct LaunchConfig {
    const char* name;   // the kernel as written at the launch site
    const void* fn;     // the kernel function (the key of cudaFuncSetAttribute)
    dim3 grid, block;
    size_t smem;        // dynamic shared memory bytes
    cudaStream_t stream;
};
// Checks the configuration against the target's limits (failing with the kernel's name), then runs
// the grid in the stream's order: `thread` is called once per CUDA thread, inside its fiber.
void launch(const LaunchConfig& c, std::function<void()> thread);

template <class... P> struct Launch {
    LaunchConfig c;
    void (*fn)(P...);
    Launch(const char* name, dim3 grid, dim3 block, size_t smem, cudaStream_t stream, void (*f)(P...))
        : c{name, (const void*)f, grid, block, smem, stream}, fn(f) {}
    template <class... A> void operator()(A&&... a) const {
        static_assert(sizeof...(A) == sizeof...(P), "kernel launched with the wrong number of arguments");
        std::tuple<std::decay_t<P>...> args(std::forward<A>(a)...);  // copied at launch, as CUDA does
        auto f = fn;
        launch(c, [f, args]() { std::apply(f, args); });
    }
};
}  // namespace emu

// kernel<<<grid, block, smem, stream>>>(args...) as PGOLF_LAUNCH(grid, block, smem, stream, kernel)(args...)
#define PGOLF_LAUNCH(grid, block, smem, stream, ...) ::emu::Launch(#__VA_ARGS__, grid, block, smem, stream, __VA_ARGS__)

#define threadIdx (::emu::g_threadIdx)
#define blockIdx (::emu::g_blockIdx)
#define blockDim (::emu::g_blockDim)
#define gridDim (::emu::g_gridDim)

// --- device functions --------------------------------------------------------------------------------
inline void __syncthreads() { emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { emu::syncwarp(mask); }
template <class X> inline X __shfl_xor_sync(unsigned mask, X v, int lane_mask, int width = 32) {
    static_assert(sizeof(X) <= 8 && std::is_trivially_copyable<X>::value, "shuffle of a value over 8 bytes");
    uint64_t bits = 0;
    memcpy(&bits, &v, sizeof(X));
    bits = emu::shfl_xor(mask, bits, lane_mask, width);
    X r;
    memcpy(&r, &bits, sizeof(X));
    return r;
}
// 64-bit integer atomics (the attention backward's fixed-point dQ sums): the fibers of a block run on one
// host thread and switch only inside collectives, so a read-modify-write is atomic here.
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
    unsigned long long old = *p;
    *p = old + v;
    return old;
}
template <class X> inline X min(X a, X b) { return b < a ? b : a; }
template <class X> inline X max(X a, X b) { return a < b ? b : a; }

// The kernel-typed overloads cuda_runtime.h declares only for nvcc.
template <class F> inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* a, F* f) {
    return ::cudaFuncGetAttributes(a, (const void*)f);
}
template <class F> inline cudaError_t cudaFuncSetAttribute(F* f, cudaFuncAttribute attr, int value) {
    return ::cudaFuncSetAttribute((const void*)f, attr, value);
}

// The dynamic shared memory of the running block (train_gpt.cu's accessor under nvcc: extern __shared__ type name[]).
#define PGOLF_DYNAMIC_SMEM(type, name) type* name = (type*)::emu::dynamic_shared()
template <class X> inline X* dynamic_smem() { return (X*)emu::dynamic_shared(); }

// The inline-PTX helpers of the attention kernels (train_gpt.cu defines them with asm under nvcc).
inline void ldmatrix_x4(uint32_t r[4], const __nv_bfloat16* p) { emu::ldmatrix_x4(r, p, false); }
inline void ldmatrix_x4_trans(uint32_t r[4], const __nv_bfloat16* p) { emu::ldmatrix_x4(r, p, true); }
inline void mma_bf16_16816(float d[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    emu::mma_bf16_16816(d, a, b0, b1);
}
inline void cp_async_16(void* dst, const void* src, bool valid) { emu::cp_async_16(dst, src, valid); }
inline void cp_async_commit() { emu::cp_async_commit(); }
template <int N> inline void cp_async_wait() { emu::cp_async_wait(N); }

// The library shims (header-only), when present: host code, so without the load/store callbacks.
#ifdef __clang__
#pragma clang attribute push(__attribute__((no_sanitize("coverage"))), apply_to = function)
#endif
#if __has_include("emu_cublaslt.h")
#include "emu_cublaslt.h"
#endif
#if __has_include("emu_cub.h")
#include "emu_cub.h"
#endif
#if defined(PGOLF_NCCL) && __has_include("emu_nccl.h")
#include "emu_nccl.h"
#endif
#ifdef __clang__
#pragma clang attribute pop
#endif
