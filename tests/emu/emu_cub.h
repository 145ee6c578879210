// CUB for the CUDA emulator: cub::DeviceRadixSort::SortPairs, the one CUB algorithm train_gpt.cu uses,
// with CUB's signature and conventions (documented in cub/device/device_radix_sort.cuh):
// - a call with d_temp_storage == nullptr only writes the temporary storage it needs to temp_storage_bytes;
// - the sort is stable, ascending, and orders keys by the bits [begin_bit, end_bit) of the key after
//   CUB's twiddle for signed integers (the sign bit flipped, so negative keys come first);
// - inputs are left unchanged; it runs in the stream's order.
// Stricter than the library: a temporary storage smaller than the size query's answer, overlapping
// input and output ranges, or a bad bit range ends the program through emu_fail. The sort stages its
// inputs in the temporary storage, so a storage that is too small or already freed shows up under
// AddressSanitizer. Test infrastructure only: never part of ./train_gpt.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <vector>
#include <cuda_runtime.h>
#include "emu_contract.h"

namespace cub {

struct DeviceRadixSort {
    // Bytes of temporary storage for num_items pairs: a staged copy of the keys and of the values, each
    // rounded up to 256 bytes (CUB's alignment of temporaries).
    template <typename KeyT, typename ValueT>
    static size_t emu_temp_bytes(size_t num_items) {
        auto round_up = [](size_t b) { return (b + 255) / 256 * 256; };
        return round_up(num_items * sizeof(KeyT)) + round_up(num_items * sizeof(ValueT)) + 256;
    }

    // What CUB issues for a sort of n pairs on sm_90 (cub/device/dispatch/dispatch_radix_sort.cuh with
    // tuning_radix_sort.cuh's Policy900), counted in emu_counts(): up to one tile (256 threads × 19 items
    // of a 4-byte type, fewer for wider ones) one single-tile kernel; beyond, onesweep: memsets of the
    // pass counters and the histograms, the histogram and exclusive-sum kernels, then per pass of 8 bits
    // a memset of the lookback and one onesweep kernel (inputs under 2^28 items: one portion). An empty
    // bit range copies keys and values instead.
    template <typename KeyT, typename ValueT>
    static void emu_count_launches(size_t n, int begin_bit, int end_bit) {
        if (begin_bit == end_bit) {  // no bits to sort: two copies (keys, values)
            emu_counts().copies += 2;
            return;
        }
        const int dominant = (int)std::max(sizeof(KeyT), sizeof(ValueT));
        const size_t tile = 256 * (size_t)std::max(1, std::min(19 * 4 / dominant, 19 * 2));
        if (n <= tile) {
            emu_count_kernel("cub::DeviceRadixSortSingleTileKernel");
            return;
        }
        emu_counts().memsets += 2;
        emu_count_kernel("cub::DeviceRadixSortHistogramKernel");
        emu_count_kernel("cub::DeviceRadixSortExclusiveSumKernel");
        for (int bit = begin_bit; bit < end_bit; bit += 8) {
            emu_counts().memsets++;
            emu_count_kernel("cub::DeviceRadixSortOnesweepKernel");
        }
    }

    template <typename KeyT, typename ValueT, typename NumItemsT>
    static cudaError_t SortPairs(void* d_temp_storage, size_t& temp_storage_bytes, const KeyT* d_keys_in,
                                 KeyT* d_keys_out, const ValueT* d_values_in, ValueT* d_values_out, NumItemsT num_items,
                                 int begin_bit = 0, int end_bit = sizeof(KeyT) * 8, cudaStream_t stream = 0) {
        static_assert(std::is_integral<KeyT>::value,
                      "the emulated radix sort takes integer keys (what train_gpt.cu sorts)");
        static_assert(std::is_integral<NumItemsT>::value, "num_items is an integer");
        if (num_items < 0) emu_fail("cub::DeviceRadixSort::SortPairs: num_items = %lld", (long long)num_items);
        const size_t n = (size_t)num_items;
        const size_t need = emu_temp_bytes<KeyT, ValueT>(n);
        if (!d_temp_storage) {
            temp_storage_bytes = need;
            return cudaSuccess;
        }
        const int bits = (int)sizeof(KeyT) * 8;
        if (begin_bit < 0 || end_bit > bits || begin_bit > end_bit)
            emu_fail("cub::DeviceRadixSort::SortPairs: bit range [%d, %d) outside a %d-bit key", begin_bit, end_bit,
                     bits);
        if (temp_storage_bytes < need)
            emu_fail(
                "cub::DeviceRadixSort::SortPairs: %zu bytes of temporary storage for %zu pairs, the size query asks "
                "%zu",
                temp_storage_bytes, n, need);
        if (n == 0) return cudaSuccess;
        emu_count_launches<KeyT, ValueT>(n, begin_bit, end_bit);
        if (!d_keys_in || !d_keys_out || !d_values_in || !d_values_out)
            emu_fail("cub::DeviceRadixSort::SortPairs: a null key or value array for %zu pairs", n);
        auto overlap = [n](const void* p, const void* q, size_t elem) {
            uintptr_t a = (uintptr_t)p, b = (uintptr_t)q;
            return a < b + n * elem && b < a + n * elem;
        };
        if (overlap(d_keys_in, d_keys_out, sizeof(KeyT)) || overlap(d_values_in, d_values_out, sizeof(ValueT)))
            emu_fail(
                "cub::DeviceRadixSort::SortPairs: input and output ranges overlap (this overload needs distinct "
                "buffers)");
        uint8_t* temp = (uint8_t*)d_temp_storage;
        size_t temp_bytes = temp_storage_bytes;
        emu_stream_submit(stream, [=] {
            KeyT* keys = (KeyT*)temp;
            ValueT* values = (ValueT*)(temp + (n * sizeof(KeyT) + 255) / 256 * 256);
            memset(temp, 0xa5,
                   temp_bytes);  // all of the storage the caller promised is written, as the GPU's passes do
            memcpy(keys, d_keys_in, n * sizeof(KeyT));
            memcpy(values, d_values_in, n * sizeof(ValueT));
            using U = typename std::make_unsigned<KeyT>::type;
            const U sign = std::is_signed<KeyT>::value ? (U)((U)1 << (bits - 1)) : (U)0;
            const int width = end_bit - begin_bit;
            const U mask = width >= bits ? (U) ~(U)0 : (U)(((U)1 << width) - 1);
            auto digit = [&](KeyT k) { return (U)((U)((U)k ^ sign) >> begin_bit) & mask; };
            std::vector<size_t> order(n);
            std::iota(order.begin(), order.end(), (size_t)0);
            std::stable_sort(order.begin(), order.end(),
                             [&](size_t x, size_t y) { return digit(keys[x]) < digit(keys[y]); });
            for (size_t i = 0; i < n; i++) {
                d_keys_out[i] = keys[order[i]];
                d_values_out[i] = values[order[i]];
            }
        });
        return cudaSuccess;
    }
};

}  // namespace cub
