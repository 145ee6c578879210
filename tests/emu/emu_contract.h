// The CUDA emulator's internal contract: what the library shims (cuBLASLt, CUB, NCCL) need from the
// emulated runtime (streams, graph capture, error reporting). Test infrastructure only: never part of
// ./train_gpt or of the byte-counted submission.
#pragma once
#include <functional>
#include <cuda_runtime_api.h>

// Runs `work` in `stream`'s order: at once, or recorded into the CUDA graph being captured on `stream`
// (then it runs each time the graph is launched).
void emu_stream_submit(cudaStream_t stream, std::function<void()> work);

// An error the emulator detected (a bad launch, an unsupported library attribute, a race, ...): prints
// one line naming what was wrong and ends the test program with a failure.
[[noreturn]] void emu_fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
