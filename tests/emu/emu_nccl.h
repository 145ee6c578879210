// NCCL for the CUDA emulator, over MPI: the communicator is MPI_COMM_WORLD (duplicated), NCCL rank r is
// MPI rank r. Built without PGOLF_MPI it is a one-rank NCCL. Test infrastructure only: never part of
// ./train_gpt.
//
// Emulated: ncclGetUniqueId, ncclCommInitRank, ncclCommDestroy/Abort, ncclCommGetAsyncError,
// ncclCommCount/UserRank, ncclGroupStart/End, ncclAllReduce, ncclBroadcast, ncclReduceScatter,
// ncclAllGather; reductions ncclSum and ncclAvg over ncclFloat32, ncclBfloat16 and ncclFloat64 (broadcast and
// all-gather move any type). Each collective runs in its stream's order. A reduction adds the ranks'
// values in rank order in fp32 and rounds once to the buffer's type (NCCL's ring rounds a bf16 partial
// sum at every hop; its order is no more defined than this one), and every rank gets the same bits.
// ncclAvg divides that sum by the number of ranks.
//
// Stricter than the library: before each collective the ranks compare what they are about to do
// (collective, count, type, op, root, sequence number); a mismatch, which on GPUs hangs or corrupts,
// ends the program through emu_fail naming both sides. The ranks must have passed the same id to
// ncclCommInitRank (i.e. broadcast it) and NCCL's ranks must be MPI's.
#pragma once
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <nccl.h>
#ifdef PGOLF_MPI
#include <mpi.h>
#endif
#include "emu_contract.h"

struct ncclComm {
    uint32_t magic;
    int rank, nranks;
    uint64_t seq;  // collectives issued so far
#ifdef PGOLF_MPI
    MPI_Comm mpi;
#endif
};

namespace emu_nccl {

const uint32_t COMM_MAGIC = 0x4e43436c;
const char ID_TAG[8] = {'E', 'M', 'U', 'N', 'C', 'C', 'L', 0};
inline int& group_depth() {
    static int d = 0;
    return d;
}

inline ncclComm* comm(ncclComm_t c, const char* what) {
    if (!c || c->magic != COMM_MAGIC)
        emu_fail("%s: a communicator that ncclCommInitRank did not make (or destroyed/aborted)", what);
    return c;
}
inline const char* type_name(ncclDataType_t t) {
    switch (t) {
    case ncclInt8: return "ncclInt8";
    case ncclUint8: return "ncclUint8";
    case ncclInt32: return "ncclInt32";
    case ncclUint32: return "ncclUint32";
    case ncclInt64: return "ncclInt64";
    case ncclUint64: return "ncclUint64";
    case ncclFloat16: return "ncclFloat16";
    case ncclFloat32: return "ncclFloat32";
    case ncclFloat64: return "ncclFloat64";
    case ncclBfloat16: return "ncclBfloat16";
    default: return "(another ncclDataType_t)";
    }
}
inline size_t type_bytes(ncclDataType_t t, const char* what) {
    switch (t) {
    case ncclInt8:
    case ncclUint8:
    case ncclFloat8e4m3:
    case ncclFloat8e5m2: return 1;
    case ncclFloat16:
    case ncclBfloat16: return 2;
    case ncclInt32:
    case ncclUint32:
    case ncclFloat32: return 4;
    case ncclInt64:
    case ncclUint64:
    case ncclFloat64: return 8;
    default: emu_fail("%s: data type %d is not an NCCL type", what, (int)t);
    }
}
// Reductions are emulated for the types and ops train_gpt.cu reduces.
inline void check_reduction(ncclDataType_t t, ncclRedOp_t op, const char* what) {
    if (t != ncclFloat32 && t != ncclBfloat16 && t != ncclFloat64)
        emu_fail("%s: reduction over %s is not emulated (only ncclFloat32, ncclBfloat16, ncclFloat64)", what,
                 type_name(t));
    if (op != ncclSum && op != ncclAvg)
        emu_fail("%s: reduction op %d is not emulated (only ncclSum, ncclAvg)", what, (int)op);
}
inline float load(const void* p, ncclDataType_t t, size_t i) {
    return t == ncclFloat32 ? ((const float*)p)[i] : __bfloat162float(((const __nv_bfloat16*)p)[i]);
}
inline void store(void* p, ncclDataType_t t, size_t i, float v) {
    if (t == ncclFloat32)
        ((float*)p)[i] = v;
    else
        ((__nv_bfloat16*)p)[i] = __float2bfloat16(v);
}
// out[i] = the ranks' in[r][i] summed in rank order (averaged for ncclAvg); in[r] is bytes of rank r.
inline void reduce_rank_order(const std::vector<const void*>& in, void* out, size_t count, ncclDataType_t t,
                              ncclRedOp_t op) {
    if (t == ncclFloat64) {  // fp64 sums (the gradient norm): in double, rank order
        for (size_t i = 0; i < count; i++) {
            double s = 0.0;
            for (const void* r : in) s += ((const double*)r)[i];
            ((double*)out)[i] = op == ncclAvg ? s / (double)in.size() : s;
        }
        return;
    }
    float scale = op == ncclAvg ? 1.0f / (float)in.size() : 1.0f;
    for (size_t i = 0; i < count; i++) {
        float s = 0.0f;
        for (const void* r : in) s += load(r, t, i);
        store(out, t, i, op == ncclAvg ? s * scale : s);
    }
}

// What a rank is about to do; the ranks compare it before each collective.
struct Call {
    uint64_t seq;
    int32_t kind;
    int32_t type;
    int32_t op;
    int32_t root;
    uint64_t count;
};
inline const char* kind_name(int k) {
    static const char* names[] = {"ncclAllReduce", "ncclBroadcast", "ncclReduceScatter", "ncclAllGather"};
    return k >= 0 && k < 4 ? names[k] : "?";
}
#ifdef PGOLF_MPI
inline void mpi_check(int rc, const char* what) {
    if (rc != MPI_SUCCESS) emu_fail("NCCL over MPI: %s failed (MPI error %d)", what, rc);
}
inline void agree(MPI_Comm mpi, int rank, int nranks, const Call& mine) {
    std::vector<Call> all(nranks);
    mpi_check(MPI_Allgather(&mine, sizeof mine, MPI_BYTE, all.data(), sizeof mine, MPI_BYTE, mpi),
              "MPI_Allgather (collective check)");
    for (int r = 0; r < nranks; r++)
        if (memcmp(&all[r], &mine, sizeof mine) != 0)
            emu_fail(
                "NCCL collective #%llu: rank %d calls %s(count %llu, type %d, op %d, root %d) but rank %d calls "
                "%s(count %llu, type %d, op %d, root %d) as its #%llu: on GPUs this hangs or corrupts",
                (unsigned long long)mine.seq, rank, kind_name(mine.kind), (unsigned long long)mine.count, mine.type,
                mine.op, mine.root, r, kind_name(all[r].kind), (unsigned long long)all[r].count, all[r].type, all[r].op,
                all[r].root, (unsigned long long)all[r].seq);
}
#endif

}  // namespace emu_nccl

inline const char* ncclGetErrorString(ncclResult_t r) {
    switch (r) {
    case ncclSuccess: return "no error";
    case ncclUnhandledCudaError: return "unhandled cuda error";
    case ncclSystemError: return "unhandled system error";
    case ncclInternalError: return "internal error";
    case ncclInvalidArgument: return "invalid argument";
    case ncclInvalidUsage: return "invalid usage";
    case ncclRemoteError: return "remote process exited or there was a network error";
    case ncclInProgress: return "NCCL operation in progress";
    default: return "unknown result code";
    }
}

inline ncclResult_t ncclGetUniqueId(ncclUniqueId* id) {
    if (!id) emu_fail("ncclGetUniqueId: null id");
    memset(id, 0, sizeof *id);
    memcpy(id->internal, emu_nccl::ID_TAG, sizeof emu_nccl::ID_TAG);
    std::random_device rd;
    for (size_t i = sizeof emu_nccl::ID_TAG; i < 24; i++) id->internal[i] = (char)rd();
    return ncclSuccess;
}

inline ncclResult_t ncclCommInitRank(ncclComm_t* out, int nranks, ncclUniqueId id, int rank) {
    if (!out) emu_fail("ncclCommInitRank: null communicator pointer");
    if (memcmp(id.internal, emu_nccl::ID_TAG, sizeof emu_nccl::ID_TAG) != 0)
        emu_fail(
            "ncclCommInitRank on rank %d: the id did not come from ncclGetUniqueId (was it broadcast from rank 0?)",
            rank);
    if (nranks < 1 || rank < 0 || rank >= nranks) emu_fail("ncclCommInitRank: rank %d of %d", rank, nranks);
#ifdef PGOLF_MPI
    MPI_Comm mpi = MPI_COMM_NULL;
    int inited = 0;
    MPI_Initialized(&inited);
    if (!inited) {
        if (nranks != 1)
            emu_fail("ncclCommInitRank: %d ranks but MPI is not initialized (NCCL is emulated over MPI)", nranks);
    } else {
        int mpi_rank = 0, mpi_size = 1;
        MPI_Comm_rank(MPI_COMM_WORLD, &mpi_rank);
        MPI_Comm_size(MPI_COMM_WORLD, &mpi_size);
        if (nranks != mpi_size || rank != mpi_rank)
            emu_fail(
                "ncclCommInitRank: NCCL rank %d of %d on MPI rank %d of %d (the emulation maps NCCL ranks to "
                "MPI_COMM_WORLD's)",
                rank, nranks, mpi_rank, mpi_size);
        emu_nccl::mpi_check(MPI_Comm_dup(MPI_COMM_WORLD, &mpi), "MPI_Comm_dup");
        std::vector<ncclUniqueId> ids(nranks);
        emu_nccl::mpi_check(MPI_Allgather(&id, sizeof id, MPI_BYTE, ids.data(), sizeof id, MPI_BYTE, mpi),
                            "MPI_Allgather (ids)");
        for (int r = 0; r < nranks; r++)
            if (memcmp(&ids[r], &id, sizeof id) != 0)
                emu_fail(
                    "ncclCommInitRank: rank %d and rank %d passed different ids (was the id broadcast from rank 0?)",
                    rank, r);
    }
    ncclComm* c = new ncclComm{emu_nccl::COMM_MAGIC, rank, nranks, 0, mpi};
#else
    if (nranks != 1)
        emu_fail("ncclCommInitRank: NCCL rank %d of %d, but this emulated build has no MPI (build with -DPGOLF_MPI)",
                 rank, nranks);
    ncclComm* c = new ncclComm{emu_nccl::COMM_MAGIC, rank, nranks, 0};
#endif
    *out = c;
    return ncclSuccess;
}
// The duplicated MPI communicator is not freed: collectives already queued on a stream still hold it,
// and MPI_Comm_free is collective, which an aborting rank cannot ask of the others.
inline ncclResult_t ncclCommDestroy(ncclComm_t c) {
    emu_nccl::comm(c, "ncclCommDestroy")->magic = 0;
    delete c;
    return ncclSuccess;
}
inline ncclResult_t ncclCommAbort(ncclComm_t c) { return ncclCommDestroy(c); }
inline ncclResult_t ncclCommGetAsyncError(ncclComm_t c, ncclResult_t* err) {
    emu_nccl::comm(c, "ncclCommGetAsyncError");
    if (!err) emu_fail("ncclCommGetAsyncError: null result pointer");
    *err = ncclSuccess;  // an MPI failure ends the job through emu_fail or MPI's own abort; nothing is left pending
    return ncclSuccess;
}
inline ncclResult_t ncclCommCount(const ncclComm_t c, int* count) {
    *count = emu_nccl::comm(c, "ncclCommCount")->nranks;
    return ncclSuccess;
}
inline ncclResult_t ncclCommUserRank(const ncclComm_t c, int* rank) {
    *rank = emu_nccl::comm(c, "ncclCommUserRank")->rank;
    return ncclSuccess;
}
// Collectives run in issue order whether grouped or not, which is what a group may do; only nesting is checked.
inline ncclResult_t ncclGroupStart() {
    emu_nccl::group_depth()++;
    return ncclSuccess;
}
inline ncclResult_t ncclGroupEnd() {
    if (emu_nccl::group_depth() <= 0) emu_fail("ncclGroupEnd without ncclGroupStart");
    emu_nccl::group_depth()--;
    return ncclSuccess;
}

namespace emu_nccl {
// Queues one collective: `body` gets every rank's send buffer (or, with one rank, just this one's).
enum Kind { ALL_REDUCE, BROADCAST, REDUCE_SCATTER, ALL_GATHER };
inline void submit(ncclComm* c, Kind kind, const void* send, void* recv, size_t count, ncclDataType_t type,
                   ncclRedOp_t op, int root, cudaStream_t stream) {
    const char* what = kind_name(kind);
    size_t esz = type_bytes(type, what);
    if (kind == ALL_REDUCE || kind == REDUCE_SCATTER) check_reduction(type, op, what);
    if (kind == BROADCAST && (root < 0 || root >= c->nranks))
        emu_fail("ncclBroadcast: root %d of %d ranks", root, c->nranks);
    if (count && (!recv || (!send && !(kind == BROADCAST && c->rank != root))))
        emu_fail("%s: null buffer (send %p, recv %p) for %zu elements", what, send, recv, count);
    Call call{c->seq++,
              (int32_t)kind,
              (int32_t)type,
              kind == ALL_REDUCE || kind == REDUCE_SCATTER ? (int32_t)op : -1,
              kind == BROADCAST ? root : -1,
              (uint64_t)count};
    int rank = c->rank, nranks = c->nranks;
    // bytes this rank contributes (send) and receives (recv)
    size_t send_bytes = count * esz * (kind == REDUCE_SCATTER ? nranks : 1);
    size_t recv_bytes = count * esz * (kind == ALL_GATHER ? nranks : 1);
#ifdef PGOLF_MPI
    MPI_Comm mpi = c->mpi;
#endif
    emu_counts().collectives++;
    emu_stream_submit(stream, [=] {
        // Stage this rank's contribution first: NCCL allows in-place (send inside recv).
        std::vector<uint8_t> mine(send && !(kind == BROADCAST && rank != root) ? send_bytes : 0);
        if (!mine.empty()) memcpy(mine.data(), send, send_bytes);
        std::vector<uint8_t> all;
#ifdef PGOLF_MPI
        if (mpi != MPI_COMM_NULL) {
            agree(mpi, rank, nranks, call);
            if (kind == BROADCAST) {
                if (rank == root) memcpy(recv, mine.data(), recv_bytes);
                if (recv_bytes) mpi_check(MPI_Bcast(recv, (int)recv_bytes, MPI_BYTE, root, mpi), "MPI_Bcast");
                return;
            }
            all.resize(send_bytes * nranks);
            if (send_bytes > (size_t)INT32_MAX)
                emu_fail("%s: %zu bytes per rank is over what the MPI emulation moves", what, send_bytes);
            if (send_bytes)
                mpi_check(
                    MPI_Allgather(mine.data(), (int)send_bytes, MPI_BYTE, all.data(), (int)send_bytes, MPI_BYTE, mpi),
                    "MPI_Allgather");
        } else
#endif
        {
            (void)call;
            if (kind == BROADCAST) {
                memcpy(recv, mine.data(), recv_bytes);
                return;
            }
            all = mine;
        }
        std::vector<const void*> parts(nranks);
        for (int r = 0; r < nranks; r++) parts[r] = all.data() + (size_t)r * send_bytes;
        if (kind == ALL_GATHER) {
            memcpy(recv, all.data(), recv_bytes);
        } else if (kind == ALL_REDUCE) {
            reduce_rank_order(parts, recv, count, type, op);
        } else {  // REDUCE_SCATTER: this rank's block of count elements
            for (int r = 0; r < nranks; r++) parts[r] = (const uint8_t*)parts[r] + (size_t)rank * count * esz;
            reduce_rank_order(parts, recv, count, type, op);
        }
    });
}
}  // namespace emu_nccl

inline ncclResult_t ncclAllReduce(const void* send, void* recv, size_t count, ncclDataType_t type, ncclRedOp_t op,
                                  ncclComm_t c, cudaStream_t stream) {
    emu_nccl::submit(emu_nccl::comm(c, "ncclAllReduce"), emu_nccl::ALL_REDUCE, send, recv, count, type, op, -1, stream);
    return ncclSuccess;
}
inline ncclResult_t ncclBroadcast(const void* send, void* recv, size_t count, ncclDataType_t type, int root,
                                  ncclComm_t c, cudaStream_t stream) {
    emu_nccl::submit(emu_nccl::comm(c, "ncclBroadcast"), emu_nccl::BROADCAST, send, recv, count, type, ncclSum, root,
                     stream);
    return ncclSuccess;
}
inline ncclResult_t ncclReduceScatter(const void* send, void* recv, size_t recvcount, ncclDataType_t type,
                                      ncclRedOp_t op, ncclComm_t c, cudaStream_t stream) {
    emu_nccl::submit(emu_nccl::comm(c, "ncclReduceScatter"), emu_nccl::REDUCE_SCATTER, send, recv, recvcount, type, op,
                     -1, stream);
    return ncclSuccess;
}
inline ncclResult_t ncclAllGather(const void* send, void* recv, size_t sendcount, ncclDataType_t type, ncclComm_t c,
                                  cudaStream_t stream) {
    emu_nccl::submit(emu_nccl::comm(c, "ncclAllGather"), emu_nccl::ALL_GATHER, send, recv, sendcount, type, ncclSum, -1,
                     stream);
    return ncclSuccess;
}
