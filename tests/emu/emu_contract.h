// The CUDA emulator's internal contract: what the library shims (cuBLASLt, CUB, NCCL) need from the
// emulated runtime (streams, graph capture, error reporting). Test infrastructure only: never part of
// ./train_gpt or of the byte-counted submission.
#pragma once
#include <cstring>
#include <functional>
#include <map>
#include <cuda_runtime_api.h>

// Runs `work` in `stream`'s order: at once, or recorded into the CUDA graph being captured on `stream`
// (then it runs each time the graph is launched).
void emu_stream_submit(cudaStream_t stream, std::function<void()> work);

// An error the emulator detected (a bad launch, an unsupported library attribute, a race, ...): prints
// one line naming what was wrong and ends the test program with a failure.
[[noreturn]] void emu_fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

// What the emulated runtime and the library shims were asked to issue, counted when issued (a call
// recorded into a CUDA graph counts once, at capture). Tests read and reset it (emu::counts() in
// emu.h) to check the cost model's launch list against a real emulated step.
struct EmuNameLess {
    bool operator()(const char* a, const char* b) const { return strcmp(a, b) < 0; }
};
struct EmuCounts {
    std::map<const char*, long, EmuNameLess> kernels;  // launches by kernel name (a string literal: the launch
                                                       // site's text, or CUB's kernel)
    long launches = 0;                    // kernel launches, CUB's included
    long memsets = 0;                     // cudaMemset / cudaMemsetAsync of at least one byte, CUB's included
    long copies = 0;                      // cudaMemcpy / cudaMemcpyAsync of at least one byte
    long gemms = 0;                       // cublasLtMatmul calls
    long collectives = 0;                 // NCCL all-reduce, broadcast, reduce-scatter and all-gather calls
    long graph_launches = 0;              // cudaGraphLaunch calls (the work they replay was counted at capture)
};
inline EmuCounts& emu_counts() {
    static EmuCounts counts;
    return counts;
}
inline void emu_count_kernel(const char* name) {
    EmuCounts& c = emu_counts();
    c.launches++;
    c.kernels[name]++;
}
