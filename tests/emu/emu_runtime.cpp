// The CUDA emulator, runtime side: fibers and their scheduler, the collectives (barriers, warp
// shuffles, ldmatrix, mma.sync, cp.async), the shared-memory checks, the launch limits of the target,
// and the CUDA runtime API (memory, streams, events, graph capture). Test infrastructure only.
//
// Compiled as its own translation unit WITHOUT the load/store callbacks (its own accesses to shared
// memory are checked explicitly), with AddressSanitizer when the tests use it.
#include "emu.h"
#include <algorithm>
#include <chrono>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <map>
#include <string>
#include <vector>
#include <sys/mman.h>
#include <unistd.h>

#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define EMU_ASAN 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__)
#define EMU_ASAN 1
#endif
#ifdef EMU_ASAN
#include <sanitizer/common_interface_defs.h>
#endif

void emu_fail(const char* fmt, ...) {
    char msg[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    fprintf(stderr, "cuda emulator: %s\n", msg);
    fprintf(stdout, "FAIL cuda emulator: %s\n", msg);  // tests/run.sh counts it
    fflush(stderr);
    fflush(stdout);
    _exit(3);
}

namespace emu {

uint3 g_threadIdx, g_blockIdx;
dim3 g_blockDim, g_gridDim;

// --- the target: launch limits per architecture ------------------------------------------------------
struct Target {
    const char* name;
    int major, minor, sms;
    size_t smem_optin;   // sharedMemPerBlockOptin: the most one block may opt in to
    size_t smem_per_sm;
};
static const Target TARGETS[] = {
    {"sm_90a", 9, 0, 132, 232448, 233472},
    {"sm_90", 9, 0, 132, 232448, 233472},
    {"sm_89", 8, 9, 128, 101376, 102400},
    {"sm_86", 8, 6, 84, 101376, 102400},
    {"sm_80", 8, 0, 108, 166912, 167936},
};
static const size_t SMEM_DEFAULT = 48 * 1024;  // without the opt-in attribute, on every target
static const Target* g_target = nullptr;
static const Target& target() {
    if (!g_target) {
        const char* a = getenv("PGOLF_EMU_ARCH");
        set_target(a && *a ? a : "sm_90a");
    }
    return *g_target;
}
void set_target(const char* arch) {
    for (const Target& t : TARGETS)
        if (!strcmp(t.name, arch)) { g_target = &t; return; }
    emu_fail("PGOLF_EMU_ARCH=%s: expected one of sm_90a, sm_90, sm_89, sm_86, sm_80", arch);
}
const char* target_name() { return target().name; }

// --- seeded random order -----------------------------------------------------------------------------
static uint64_t g_rng = 0;
static uint64_t rng_next() {
    if (!g_rng) {
        const char* s = getenv("PGOLF_EMU_SEED");
        g_rng = 0x9e3779b97f4a7c15ull ^ (s ? strtoull(s, nullptr, 10) : 1);
    }
    uint64_t z = (g_rng += 0x9e3779b97f4a7c15ull);  // splitmix64
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// --- fibers ------------------------------------------------------------------------------------------
extern "C" void emu_switch_context(void** save_sp, void* to_sp);
extern "C" void emu_fiber_trampoline();
extern "C" void emu_fiber_entry();
asm(R"(
    .text
    .globl emu_switch_context
    .type emu_switch_context,@function
emu_switch_context:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $16, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $16, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch_context, .-emu_switch_context
    .globl emu_fiber_trampoline
    .type emu_fiber_trampoline,@function
emu_fiber_trampoline:
    andq $-16, %rsp
    call emu_fiber_entry
    ud2
    .size emu_fiber_trampoline, .-emu_fiber_trampoline
)");

#ifdef EMU_ASAN
static const size_t STACK_BYTES = 512 * 1024;  // ASan's redzones make frames larger
#else
static const size_t STACK_BYTES = 128 * 1024;
#endif
static const int MAX_THREADS = 1024;

enum State { NEW, READY, BLOCKED, DONE };
struct AsyncCopy { uint8_t* dst; uint8_t data[16]; };
struct Thread {
    void* sp = nullptr;
    char* stack = nullptr;  // lowest usable byte
    int tid = 0;
    uint3 idx{};
    State state = NEW;
    const char* waiting = "";
    // posted operands of the warp collective this lane waits in
    uint64_t val = 0;
    int arg = 0;
    const void* in = nullptr;
    void* out = nullptr;
    // cp.async: copies issued since the last commit, and committed groups, oldest first
    std::vector<AsyncCopy> open;
    std::vector<std::vector<AsyncCopy>> groups;  // groups[done..] are in flight, oldest first
    size_t done = 0;
#ifdef EMU_ASAN
    void* fake_stack = nullptr;
#endif
};

enum Kind { K_SHFL, K_SYNCWARP, K_LDMATRIX, K_LDMATRIX_T, K_MMA };
static const char* KIND_NAME[] = {"__shfl_xor_sync", "__syncwarp", "ldmatrix", "ldmatrix.trans", "mma.sync"};
struct Collective { Kind kind; unsigned mask, arrived; };

// The running block.
static Thread* g_threads = nullptr;
static int g_nthreads = 0, g_live = 0, g_exited = 0, g_bar_arrived = 0;
static Thread* g_cur = nullptr;
static void* g_sched_sp = nullptr;
static std::vector<int> g_ready;
static std::vector<Collective> g_warp_open[MAX_THREADS / 32];
static uint32_t g_warp_epoch[MAX_THREADS / 32];
static const LaunchConfig* g_launch = nullptr;
static const std::function<void()>* g_body = nullptr;
#ifdef EMU_ASAN
static void* g_sched_fake = nullptr;
static const void* g_main_stack_bottom = nullptr;
static size_t g_main_stack_size = 0;
#endif

static std::string where() {
    char b[256];
    snprintf(b, sizeof b, "%s, block (%u,%u,%u) of grid (%u,%u,%u), block (%u,%u,%u)", g_launch ? g_launch->name : "?",
             g_blockIdx.x, g_blockIdx.y, g_blockIdx.z, g_gridDim.x, g_gridDim.y, g_gridDim.z, g_blockDim.x,
             g_blockDim.y, g_blockDim.z);
    return b;
}
static std::string thread_name(int tid) {
    char b[96];
    int bx = g_blockDim.x, by = g_blockDim.y;
    snprintf(b, sizeof b, "thread %d (%d,%d,%d)", tid, tid % bx, tid / bx % by, tid / (bx * by));
    return b;
}

static void init_stacks() {
    if (g_threads) return;
    g_threads = new Thread[MAX_THREADS];
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    size_t each = STACK_BYTES + page;  // a guard page below each stack
    char* base = (char*)mmap(nullptr, each * MAX_THREADS, PROT_READ | PROT_WRITE,
                             MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (base == MAP_FAILED) emu_fail("cannot map %zu MiB of fiber stacks", each * MAX_THREADS >> 20);
    for (int i = 0; i < MAX_THREADS; i++) {
        mprotect(base + i * each, page, PROT_NONE);
        g_threads[i].stack = base + i * each + page;
    }
}

static void switch_to_scheduler(bool finished) {
    Thread* t = g_cur;
#ifdef EMU_ASAN
    __sanitizer_start_switch_fiber(finished ? nullptr : &t->fake_stack, g_main_stack_bottom, g_main_stack_size);
#else
    (void)finished;
#endif
    emu_switch_context(&t->sp, g_sched_sp);
#ifdef EMU_ASAN
    __sanitizer_finish_switch_fiber(t->fake_stack, &g_main_stack_bottom, &g_main_stack_size);
#endif
}
static void resume(Thread& t) {
    g_cur = &t;
    g_threadIdx = t.idx;
    t.state = READY;
#ifdef EMU_ASAN
    __sanitizer_start_switch_fiber(&g_sched_fake, t.stack, STACK_BYTES);
#endif
    emu_switch_context(&g_sched_sp, t.sp);
#ifdef EMU_ASAN
    __sanitizer_finish_switch_fiber(g_sched_fake, nullptr, nullptr);
#endif
    g_cur = nullptr;
}
static void block(const char* what) {
    g_cur->state = BLOCKED;
    g_cur->waiting = what;
    switch_to_scheduler(false);
    g_threadIdx = g_cur->idx;
}
static void wake(Thread& t) {
    t.state = READY;
    g_ready.push_back(t.tid);
}

// --- shared memory: where it is, and what each byte has seen -------------------------------------------
extern "C" char __start_emu_shared[] __attribute__((weak));
extern "C" char __stop_emu_shared[] __attribute__((weak));
static const size_t DYN_MAX = 232448;
static uint8_t* g_dyn = nullptr;                 // the dynamic shared memory of the running block
// Checked ranges: empty outside kernels, so the load/store callbacks cost two compares there.
static uintptr_t g_sta_lo = 0, g_sta_n = 0, g_dyn_lo = 0, g_dyn_n = 0;
struct Shadow {
    uint32_t w_epoch, w_wepoch, r_epoch, r_wepoch;
    uint16_t w_tid, r_tid;
    uint8_t r_several;  // read by more than one thread in r_epoch (r_tid is the first)
    uint8_t r_xwarp;    // ... of different warps
    uint8_t pending;    // a cp.async into this byte has not completed
};
static Shadow* g_sta_shadow = nullptr;
static Shadow* g_dyn_shadow = nullptr;
static uint32_t g_epoch = 1, g_block_epoch0 = 1;  // +1 at each block start and each __syncthreads

static bool shared_range(uintptr_t a, size_t n, Shadow** sh, const char** region, size_t* off) {
    if (a - g_sta_lo < g_sta_n) {
        *off = a - g_sta_lo; *sh = g_sta_shadow + *off; *region = "static";
        if (*off + n > g_sta_n)
            emu_fail("%s: %s accesses %zu bytes past the end of static shared memory", where().c_str(),
                     thread_name(g_cur ? g_cur->tid : -1).c_str(), *off + n - g_sta_n);
        return true;
    }
    if (a - g_dyn_lo < g_dyn_n) {
        *off = a - g_dyn_lo; *sh = g_dyn_shadow + *off; *region = "dynamic";
        if (*off + n > g_dyn_n)
            emu_fail("%s: %s accesses shared memory past the %zu dynamic bytes of the launch", where().c_str(),
                     thread_name(g_cur ? g_cur->tid : -1).c_str(), (size_t)g_dyn_n);
        return true;
    }
    // just past the dynamic allocation of this launch, inside what a larger launch could use
    if (g_dyn_n && a - g_dyn_lo < DYN_MAX)
        emu_fail("%s: %s accesses dynamic shared offset %zu, past the %zu bytes the launch gave", where().c_str(),
                 thread_name(g_cur ? g_cur->tid : -1).c_str(), (size_t)(a - g_dyn_lo), (size_t)g_dyn_n);
    return false;
}
// Was an access by `tid` (in barrier interval `epoch`, its warp at `wepoch`) ordered before now by `cur`?
static bool ordered(uint32_t epoch, uint32_t wepoch, int tid, int cur) {
    if (epoch != g_epoch || tid == cur) return true;
    return tid / 32 == cur / 32 && wepoch != g_warp_epoch[cur / 32];
}
static void race(const char* region, size_t off, int t1, const char* what1, int t2, const char* what2) {
    emu_fail("%s: shared-memory race at %s shared offset %zu: %s %s it and %s %s it with no barrier between",
             where().c_str(), region, off, thread_name(t1).c_str(), what1, thread_name(t2).c_str(), what2);
}
static void check_access(uintptr_t a, size_t n, bool write, int tid) {
    Shadow* sh;
    const char* region;
    size_t off;
    if (!shared_range(a, n, &sh, &region, &off)) return;
    uint32_t we = g_warp_epoch[tid / 32];
    for (size_t i = 0; i < n; i++) {
        Shadow& s = sh[i];
        if (s.pending)
            emu_fail("%s: %s %s %s shared offset %zu while a cp.async into it has not completed (cp.async.wait_group "
                     "missing)",
                     where().c_str(), thread_name(tid).c_str(), write ? "writes" : "reads", region, off + i);
        bool written = s.w_epoch >= g_block_epoch0;
        if (!write) {
            if (!written)
                emu_fail("%s: %s reads %s shared offset %zu, never written in this block (uninitialized shared memory)",
                         where().c_str(), thread_name(tid).c_str(), region, off + i);
            if (!ordered(s.w_epoch, s.w_wepoch, s.w_tid, tid)) race(region, off + i, s.w_tid, "wrote", tid, "reads");
            if (s.r_epoch != g_epoch || s.r_epoch < g_block_epoch0) {
                s.r_epoch = g_epoch; s.r_wepoch = we; s.r_tid = (uint16_t)tid; s.r_several = 0; s.r_xwarp = 0;
            } else if (s.r_tid != tid) {
                s.r_several = 1;
                if (s.r_tid / 32 != tid / 32) s.r_xwarp = 1;
                s.r_wepoch = we;
            } else {
                s.r_wepoch = we;
            }
        } else {
            if (written && !ordered(s.w_epoch, s.w_wepoch, s.w_tid, tid))
                race(region, off + i, s.w_tid, "wrote", tid, "writes");
            if (s.r_epoch == g_epoch && s.r_epoch >= g_block_epoch0) {
                bool other = s.r_tid != tid || s.r_several;
                bool warp_ordered = !s.r_xwarp && s.r_tid / 32 == tid / 32 && s.r_wepoch != we;
                if (other && !warp_ordered)
                    race(region, off + i, s.r_tid, s.r_several ? "(and others) read" : "read", tid, "writes");
            }
            s.w_epoch = g_epoch; s.w_wepoch = we; s.w_tid = (uint16_t)tid;
        }
    }
}
static inline void on_access(const void* p, size_t n, bool write) {
    uintptr_t a = (uintptr_t)p;
    if (a - g_sta_lo >= g_sta_n && a - g_dyn_lo >= DYN_MAX) return;
    if (!g_cur) return;
    check_access(a, n, write, g_cur->tid);
}

void* dynamic_shared() { return g_dyn; }

// --- barriers and warp collectives ----------------------------------------------------------------------
static void fail_exited(const char* what, int waiting_tid) {
    for (int i = 0; i < g_nthreads; i++)
        if (g_threads[i].state == DONE)
            emu_fail("%s: %s reached by %s while %s has exited: every thread of the block must reach it",
                     where().c_str(), what, thread_name(waiting_tid).c_str(), thread_name(i).c_str());
    emu_fail("%s: %s reached while a thread has exited", where().c_str(), what);
}
void syncthreads() {
    if (!g_cur) emu_fail("__syncthreads outside a kernel");
    if (g_exited) fail_exited("__syncthreads", g_cur->tid);
    if (!g_warp_open[g_cur->tid / 32].empty()) {
        const Collective& c = g_warp_open[g_cur->tid / 32][0];
        emu_fail("%s: %s reaches __syncthreads while lanes 0x%08x of its warp wait for it in %s (mask 0x%08x)",
                 where().c_str(), thread_name(g_cur->tid).c_str(), c.arrived, KIND_NAME[c.kind], c.mask);
    }
    if (++g_bar_arrived == g_nthreads) {
        g_bar_arrived = 0;
        g_epoch++;
        for (int i = 0; i < g_nthreads; i++)
            if (g_threads[i].state == BLOCKED && &g_threads[i] != g_cur) wake(g_threads[i]);
        return;
    }
    block("__syncthreads");
}

// Joins the warp collective `kind` over `mask`; returns true in the lane that completes it (which then
// computes the results for every lane), false in the others (which wait until it has).
static bool arrive(Kind kind, unsigned mask) {
    Thread& t = *g_cur;
    int warp = t.tid / 32, lane = t.tid % 32;
    if (!(mask >> lane & 1))
        emu_fail("%s: %s calls %s with mask 0x%08x, which does not name its own lane %d", where().c_str(),
                 thread_name(t.tid).c_str(), KIND_NAME[kind], mask, lane);
    std::vector<Collective>& open = g_warp_open[warp];
    Collective* c = nullptr;
    for (Collective& o : open) {
        if (!(o.mask & mask)) continue;
        if (o.mask != mask || o.kind != kind)
            emu_fail("%s: %s calls %s with mask 0x%08x while lanes 0x%08x of its warp wait in %s with mask 0x%08x",
                     where().c_str(), thread_name(t.tid).c_str(), KIND_NAME[kind], mask, o.arrived, KIND_NAME[o.kind],
                     o.mask);
        c = &o;
    }
    if (!c) {  // the first lane to arrive checks the mask; a lane that exits later fails in emu_fiber_entry
        for (int l = 0; l < 32; l++) {
            if (!(mask >> l & 1)) continue;
            int o = warp * 32 + l;
            if (o >= g_nthreads)
                emu_fail("%s: %s calls %s with mask 0x%08x naming lane %d, which the block does not have",
                         where().c_str(), thread_name(t.tid).c_str(), KIND_NAME[kind], mask, l);
            if (g_threads[o].state == DONE)
                emu_fail("%s: %s calls %s with mask 0x%08x naming lane %d, which has exited (mask does not match the "
                         "lanes that arrive)",
                         where().c_str(), thread_name(t.tid).c_str(), KIND_NAME[kind], mask, l);
        }
        open.push_back({kind, mask, 0u});
        c = &open.back();
    }
    c->arrived |= 1u << lane;
    if (c->arrived == mask) {
        for (size_t i = 0; i < open.size(); i++)
            if (&open[i] == c) { open.erase(open.begin() + i); break; }
        return true;
    }
    block(KIND_NAME[kind]);
    return false;
}
static void release(unsigned mask) {
    int w0 = g_cur->tid / 32 * 32;
    for (int l = 0; l < 32; l++)
        if ((mask >> l & 1) && w0 + l != g_cur->tid) wake(g_threads[w0 + l]);
}

void syncwarp(unsigned mask) {
    if (!arrive(K_SYNCWARP, mask)) return;
    g_warp_epoch[g_cur->tid / 32]++;
    release(mask);
}

uint64_t shfl_xor(unsigned mask, uint64_t bits, int lane_mask, int width) {
    Thread& t = *g_cur;
    if (width <= 0 || width > 32 || (width & (width - 1)))
        emu_fail("%s: __shfl_xor_sync width %d, expected a power of 2 up to 32", where().c_str(), width);
    t.val = bits;
    t.arg = lane_mask;
    if (arrive(K_SHFL, mask)) {
        int w0 = t.tid / 32 * 32;
        uint64_t out[32];
        for (int l = 0; l < 32; l++) {
            if (!(mask >> l & 1)) continue;
            int src = l ^ g_threads[w0 + l].arg;
            if (src / width != l / width || src > 31) src = l;  // outside its width segment: its own value
            if (!(mask >> src & 1))
                emu_fail("%s: %s reads lane %d in __shfl_xor_sync, which mask 0x%08x leaves out", where().c_str(),
                         thread_name(w0 + l).c_str(), src, mask);
            out[l] = g_threads[w0 + src].val;
        }
        for (int l = 0; l < 32; l++)
            if (mask >> l & 1) g_threads[w0 + l].val = out[l];
        release(mask);
    }
    return t.val;
}

// ldmatrix .x4 .b16: lanes 8i..8i+7 give the 16-byte row addresses of 8×8 matrix i; register i of
// lane l gets row l/4, columns 2(l%4) and 2(l%4)+1 of matrix i (with .trans: of its transpose), the
// lower column in the low half (PTX ISA, "Warp-level matrix load instruction: ldmatrix").
void ldmatrix_x4(uint32_t r[4], const void* p, bool trans) {
    Thread& t = *g_cur;
    t.in = p;
    t.out = r;
    Kind kind = trans ? K_LDMATRIX_T : K_LDMATRIX;
    if (!arrive(kind, 0xffffffffu)) return;
    int w0 = t.tid / 32 * 32;
    uint16_t m[4][8][8];
    for (int l = 0; l < 32; l++) {
        const uint8_t* row = (const uint8_t*)g_threads[w0 + l].in;
        Shadow* sh;
        const char* region;
        size_t off;
        if ((uintptr_t)row % 16 || !shared_range((uintptr_t)row, 16, &sh, &region, &off))
            emu_fail("%s: %s gives ldmatrix row address %p, expected 16-byte aligned shared memory", where().c_str(),
                     thread_name(w0 + l).c_str(), (const void*)row);
        check_access((uintptr_t)row, 16, false, w0 + l);
        memcpy(m[l / 8][l % 8], row, 16);
    }
    for (int l = 0; l < 32; l++) {
        uint32_t* out = (uint32_t*)g_threads[w0 + l].out;
        int a = l / 4, b = 2 * (l % 4);
        for (int i = 0; i < 4; i++) {
            uint16_t lo = trans ? m[i][b][a] : m[i][a][b];
            uint16_t hi = trans ? m[i][b + 1][a] : m[i][a][b + 1];
            out[i] = (uint32_t)lo | (uint32_t)hi << 16;
        }
    }
    release(0xffffffffu);
}

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 (PTX ISA, "Matrix Fragments for mma.m16n8k16
// with floating point type"): with g = lane/4, c = 2(lane%4):
//   A (16×16): a[0] = (g, c..c+1), a[1] = (g+8, c..c+1), a[2] = (g, c+8..c+9), a[3] = (g+8, c+8..c+9)
//   B (16×8):  b0 = (k c..c+1, n g), b1 = (k c+8..c+9, n g)
//   C, D (16×8 fp32): d[0..1] = (g, c..c+1), d[2..3] = (g+8, c..c+1)
// Products of bf16 values are exact in fp32; the sum over k is formed in fp32 in k order.
void mma_bf16_16816(float d[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    Thread& t = *g_cur;
    t.in = a;
    t.val = (uint64_t)b0 | (uint64_t)b1 << 32;
    t.out = d;
    if (!arrive(K_MMA, 0xffffffffu)) return;
    int w0 = t.tid / 32 * 32;
    auto bf = [](uint32_t x) { uint32_t u = x << 16; float f; memcpy(&f, &u, 4); return f; };
    float A[16][16], B[16][8], C[16][8];
    for (int l = 0; l < 32; l++) {
        const Thread& o = g_threads[w0 + l];
        const uint32_t* ar = (const uint32_t*)o.in;
        const float* dr = (const float*)o.out;
        int g = l / 4, c = 2 * (l % 4);
        for (int h = 0; h < 2; h++) {
            A[g][c + h] = bf(ar[0] >> 16 * h & 0xffff);
            A[g + 8][c + h] = bf(ar[1] >> 16 * h & 0xffff);
            A[g][c + 8 + h] = bf(ar[2] >> 16 * h & 0xffff);
            A[g + 8][c + 8 + h] = bf(ar[3] >> 16 * h & 0xffff);
            B[c + h][g] = bf((uint32_t)(o.val >> 16 * h) & 0xffff);
            B[c + 8 + h][g] = bf((uint32_t)(o.val >> (32 + 16 * h)) & 0xffff);
            C[g][c + h] = dr[h];
            C[g + 8][c + h] = dr[2 + h];
        }
    }
    for (int l = 0; l < 32; l++) {
        float* dr = (float*)g_threads[w0 + l].out;
        int g = l / 4, c = 2 * (l % 4);
        for (int e = 0; e < 4; e++) {
            int row = g + (e >> 1) * 8, col = c + (e & 1);
            float s = 0.f;
            for (int k = 0; k < 16; k++) s += A[row][k] * B[k][col];
            dr[e] = C[row][col] + s;
        }
    }
    release(0xffffffffu);
}

// cp.async.cg.shared.global 16 bytes: the source is read at issue, the shared bytes are written when
// the thread's cp.async.wait_group retires the group; until then any access to them is an error.
void cp_async_16(void* dst, const void* src, bool valid) {
    Thread& t = *g_cur;
    Shadow* sh;
    const char* region;
    size_t off;
    if ((uintptr_t)dst % 16 || !shared_range((uintptr_t)dst, 16, &sh, &region, &off))
        emu_fail("%s: %s: cp.async destination %p is not 16-byte aligned shared memory", where().c_str(),
                 thread_name(t.tid).c_str(), dst);
    if ((uintptr_t)src % 16)
        emu_fail("%s: %s: cp.async source %p is not 16-byte aligned", where().c_str(), thread_name(t.tid).c_str(), src);
    for (int i = 0; i < 16; i++)
        if (sh[i].pending)
            emu_fail("%s: %s: cp.async into %s shared offset %zu, which an earlier cp.async has not finished writing",
                     where().c_str(), thread_name(t.tid).c_str(), region, off + i);
    AsyncCopy c;
    c.dst = (uint8_t*)dst;
    if (valid) memcpy(c.data, src, 16);
    else memset(c.data, 0, 16);
    t.open.push_back(c);
    for (int i = 0; i < 16; i++) sh[i].pending = 1;
}
static void complete(Thread& t, std::vector<AsyncCopy>& group) {
    for (AsyncCopy& c : group) {
        Shadow* sh;
        const char* region;
        size_t off;
        shared_range((uintptr_t)c.dst, 16, &sh, &region, &off);
        for (int i = 0; i < 16; i++) sh[i].pending = 0;
        check_access((uintptr_t)c.dst, 16, true, t.tid);
        memcpy(c.dst, c.data, 16);
    }
    group.clear();
}
void cp_async_commit() {
    Thread& t = *g_cur;
    t.groups.push_back(std::move(t.open));
    t.open.clear();
}
void cp_async_wait(int n) {
    Thread& t = *g_cur;
    while ((int)(t.groups.size() - t.done) > n) complete(t, t.groups[t.done++]);
    if (t.done == t.groups.size()) { t.groups.clear(); t.done = 0; }
}

// --- running a grid ------------------------------------------------------------------------------------
extern "C" void emu_fiber_entry() {
#ifdef EMU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &g_main_stack_bottom, &g_main_stack_size);
#endif
    g_threadIdx = g_cur->idx;
    (*g_body)();
    Thread& t = *g_cur;
    for (size_t g = t.done; g < t.groups.size(); g++) complete(t, t.groups[g]);  // copies still in flight land at exit
    if (!t.groups.empty()) t.groups.clear();
    t.done = 0;
    if (!t.open.empty()) complete(t, t.open);
    t.state = DONE;
    g_exited++;
    g_live--;
    if (g_bar_arrived) {
        for (int i = 0; i < g_nthreads; i++)
            if (g_threads[i].state == BLOCKED && !strcmp(g_threads[i].waiting, "__syncthreads"))
                emu_fail("%s: %s exits while %s waits at __syncthreads: every thread of the block must reach it",
                         where().c_str(), thread_name(t.tid).c_str(), thread_name(i).c_str());
    }
    for (const Collective& c : g_warp_open[t.tid / 32])
        if (c.mask >> (t.tid % 32) & 1)
            emu_fail("%s: %s exits while lanes 0x%08x of its warp wait for it in %s (mask 0x%08x)", where().c_str(),
                     thread_name(t.tid).c_str(), c.arrived, KIND_NAME[c.kind], c.mask);
    switch_to_scheduler(true);
    __builtin_unreachable();
}

static void deadlock() {
    std::string s;
    int at_bar = 0;
    for (int i = 0; i < g_nthreads; i++)
        at_bar += g_threads[i].state == BLOCKED && !strcmp(g_threads[i].waiting, "__syncthreads");
    if (at_bar) s += std::to_string(at_bar) + " thread(s) wait at __syncthreads; ";
    for (int w = 0; w * 32 < g_nthreads; w++)
        for (const Collective& c : g_warp_open[w]) {
            char b[200];
            snprintf(b, sizeof b, "warp %d: lanes 0x%08x wait in %s for lanes 0x%08x; ", w, c.arrived,
                     KIND_NAME[c.kind], c.mask & ~c.arrived);
            s += b;
        }
    emu_fail("%s: deadlock: %s%d of %d threads have exited", where().c_str(), s.c_str(), g_exited, g_nthreads);
}

static void run_block() {
    int bx = g_blockDim.x, by = g_blockDim.y;
    g_nthreads = bx * by * g_blockDim.z;
    g_live = g_nthreads;
    g_exited = g_bar_arrived = 0;
    g_epoch++;
    g_block_epoch0 = g_epoch;
    for (int w = 0; w * 32 < g_nthreads; w++) g_warp_open[w].clear();
    if (g_sta_n) memset((void*)g_sta_lo, 0xff, g_sta_n);  // NaN pattern: stale values never look plausible
    if (g_dyn_n) memset(g_dyn, 0xff, g_dyn_n);
    uint32_t csr[2];
    asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(csr[0]), "=m"(csr[1]));
    g_ready.clear();
    for (int i = 0; i < g_nthreads; i++) {
        Thread& t = g_threads[i];
        t.tid = i;
        t.idx = make_uint3(i % bx, i / bx % by, i / (bx * by));
        t.state = NEW;
        // initial frame: mxcsr, fpu cw, r15..r12, rbx, rbp, return address = the trampoline
        uint64_t* sp = (uint64_t*)(t.stack + STACK_BYTES - 128);
        memcpy(sp, csr, 8);
        sp[1] = 0;
        for (int r = 2; r < 8; r++) sp[r] = 0;
        sp[8] = (uint64_t)(uintptr_t)&emu_fiber_trampoline;
        t.sp = sp;
        g_ready.push_back(i);
    }
    while (g_live) {
        if (g_ready.empty()) deadlock();
        size_t k = rng_next() % g_ready.size();
        int i = g_ready[k];
        g_ready[k] = g_ready.back();
        g_ready.pop_back();
        resume(g_threads[i]);
    }
}

static std::map<const void*, int> g_max_dynamic_smem;  // cudaFuncAttributeMaxDynamicSharedMemorySize per kernel

static void run_grid(const LaunchConfig& c, const std::function<void()>& body) {
    init_stacks();
    if (!g_dyn) {
        g_dyn = (uint8_t*)aligned_alloc(128, DYN_MAX);
        g_dyn_shadow = (Shadow*)calloc(DYN_MAX, sizeof(Shadow));
        size_t sn = __start_emu_shared ? (size_t)(__stop_emu_shared - __start_emu_shared) : 0;
        g_sta_shadow = (Shadow*)calloc(sn + 1, sizeof(Shadow));
    }
    const LaunchConfig* saved_launch = g_launch;
    const std::function<void()>* saved_body = g_body;
    g_launch = &c;
    g_body = &body;
    g_gridDim = c.grid;
    g_blockDim = c.block;
    g_sta_lo = (uintptr_t)__start_emu_shared;
    g_sta_n = __start_emu_shared ? (size_t)(__stop_emu_shared - __start_emu_shared) : 0;
    g_dyn_lo = (uintptr_t)g_dyn;
    g_dyn_n = c.smem;
    size_t nb = (size_t)c.grid.x * c.grid.y * c.grid.z;
    std::vector<uint32_t> order(nb);
    for (size_t i = 0; i < nb; i++) order[i] = (uint32_t)i;
    for (size_t i = nb; i > 1; i--) std::swap(order[i - 1], order[rng_next() % i]);
    for (size_t k = 0; k < nb; k++) {
        size_t b = order[k];
        g_blockIdx = make_uint3(b % c.grid.x, b / c.grid.x % c.grid.y, b / ((size_t)c.grid.x * c.grid.y));
        run_block();
    }
    g_sta_n = g_dyn_n = 0;
    g_dyn_lo = g_sta_lo = 0;
    g_launch = saved_launch;
    g_body = saved_body;
}

void launch(const LaunchConfig& c, std::function<void()> thread) {
    const Target& tg = target();
    size_t threads = (size_t)c.block.x * c.block.y * c.block.z;
    if (!threads || threads > 1024 || c.block.x > 1024 || c.block.y > 1024 || c.block.z > 64)
        emu_fail(
            "launch of %s: block (%u,%u,%u) is not a valid block on %s (at most 1024 threads; x, y ≤ 1024, z ≤ 64)",
            c.name, c.block.x, c.block.y, c.block.z, tg.name);
    if (!c.grid.x || !c.grid.y || !c.grid.z || c.grid.x > 2147483647u || c.grid.y > 65535 || c.grid.z > 65535)
        emu_fail("launch of %s: grid (%u,%u,%u) is not a valid grid on %s (x ≤ 2^31−1, y, z ≤ 65535, none 0)",
                 c.name, c.grid.x, c.grid.y, c.grid.z, tg.name);
    if (c.smem > SMEM_DEFAULT) {
        auto it = g_max_dynamic_smem.find(c.fn);
        int optin = it == g_max_dynamic_smem.end() ? 0 : it->second;
        if (c.smem > tg.smem_optin)
            emu_fail("launch of %s: %zu bytes of dynamic shared memory, over the %zu a block can have on %s", c.name,
                     c.smem, tg.smem_optin, tg.name);
        if ((size_t)optin < c.smem)
            emu_fail("launch of %s: %zu bytes of dynamic shared memory, over the %zu default without "
                     "cudaFuncSetAttribute(cudaFuncAttributeMaxDynamicSharedMemorySize) (set: %d)",
                     c.name, c.smem, SMEM_DEFAULT, optin);
    }
    LaunchConfig copy = c;
    emu_count_kernel(c.name);
    emu_stream_submit(c.stream, [copy, thread]() { run_grid(copy, thread); });
}

}  // namespace emu

// --- the load/store callbacks of the kernels' translation unit (-fsanitize-coverage=trace-loads,trace-stores)
extern "C" {
void __sanitizer_cov_load1(uint8_t* p) { emu::on_access(p, 1, false); }
void __sanitizer_cov_load2(uint16_t* p) { emu::on_access(p, 2, false); }
void __sanitizer_cov_load4(uint32_t* p) { emu::on_access(p, 4, false); }
void __sanitizer_cov_load8(uint64_t* p) { emu::on_access(p, 8, false); }
void __sanitizer_cov_load16(__int128* p) { emu::on_access(p, 16, false); }
void __sanitizer_cov_store1(uint8_t* p) { emu::on_access(p, 1, true); }
void __sanitizer_cov_store2(uint16_t* p) { emu::on_access(p, 2, true); }
void __sanitizer_cov_store4(uint32_t* p) { emu::on_access(p, 4, true); }
void __sanitizer_cov_store8(uint64_t* p) { emu::on_access(p, 8, true); }
void __sanitizer_cov_store16(__int128* p) { emu::on_access(p, 16, true); }
}

// =========================================================================================================
// The CUDA runtime API
// =========================================================================================================
struct CUgraph_st { std::vector<std::function<void()>> work; };
struct CUgraphExec_st { std::vector<std::function<void()>> work; };
struct CUstream_st { CUgraph_st* capture = nullptr; };
struct CUevent_st { double ms = 0; };

static cudaError_t g_last_error = cudaSuccess;
static int g_capturing = 0;  // streams being captured
static std::map<const void*, size_t> g_allocs;
static size_t g_alloc_bytes = 0;
static std::map<const void*, size_t> g_host_allocs;  // cudaMallocHost's
static size_t g_host_alloc_bytes = 0;
static long g_graph_execs = 0;
static const size_t TOTAL_MEMORY = (size_t)80 << 30;

static cudaError_t err(cudaError_t e) {
    if (e != cudaSuccess) g_last_error = e;
    return e;
}

void emu_stream_submit(cudaStream_t stream, std::function<void()> work) {
    if (stream && stream->capture) {
        stream->capture->work.push_back(std::move(work));
        return;
    }
    if (!stream && g_capturing)
        emu_fail("work submitted to the legacy default stream while a stream is being captured into a CUDA graph "
                 "(cudaErrorStreamCaptureImplicit on a GPU): launch it on the capturing stream");
    work();
}

namespace emu {
size_t allocated_bytes() { return g_alloc_bytes; }
size_t host_allocated_bytes() { return g_host_alloc_bytes; }
long graph_execs() { return g_graph_execs; }
}

extern "C" {
// The node: PGOLF_EMU_DEVICES GPUs (default 8, as an 8×H100 node), so that mpirun -np N runs one
// emulated device per rank; each process emulates only the device it sets.
static int device_count() {
    const char* e = getenv("PGOLF_EMU_DEVICES");
    return e && atoi(e) > 0 ? atoi(e) : 8;
}
static int g_device = 0;
cudaError_t cudaGetDeviceCount(int* n) { *n = device_count(); return cudaSuccess; }
cudaError_t cudaSetDevice(int d) {
    if (d < 0 || d >= device_count()) return err(cudaErrorInvalidDevice);
    g_device = d;
    return cudaSuccess;
}
cudaError_t cudaGetDevice(int* d) { *d = g_device; return cudaSuccess; }
cudaError_t cudaDriverGetVersion(int* v) { *v = CUDART_VERSION; return cudaSuccess; }
cudaError_t cudaRuntimeGetVersion(int* v) { *v = CUDART_VERSION; return cudaSuccess; }
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int d) {
    if (d < 0 || d >= device_count()) return err(cudaErrorInvalidDevice);
    const emu::Target& t = emu::target();
    memset(p, 0, sizeof *p);
    snprintf(p->name, sizeof p->name, "pgolf CUDA emulator (%s)", t.name);
    p->major = t.major;
    p->minor = t.minor;
    p->multiProcessorCount = t.sms;
    p->totalGlobalMem = TOTAL_MEMORY;
    p->sharedMemPerBlock = emu::SMEM_DEFAULT;
    p->sharedMemPerBlockOptin = t.smem_optin;
    p->sharedMemPerMultiprocessor = t.smem_per_sm;
    p->regsPerBlock = 65536;
    p->warpSize = 32;
    p->maxThreadsPerBlock = 1024;
    p->maxThreadsDim[0] = 1024; p->maxThreadsDim[1] = 1024; p->maxThreadsDim[2] = 64;
    p->maxGridSize[0] = 2147483647; p->maxGridSize[1] = 65535; p->maxGridSize[2] = 65535;
    p->maxThreadsPerMultiProcessor = 2048;
    return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int d) {
    cudaDeviceProp p;
    cudaGetDeviceProperties(&p, d);
    switch (a) {
        case cudaDevAttrMultiProcessorCount: *v = p.multiProcessorCount; return cudaSuccess;
        case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = (int)p.sharedMemPerBlockOptin; return cudaSuccess;
        case cudaDevAttrComputeCapabilityMajor: *v = p.major; return cudaSuccess;
        case cudaDevAttrComputeCapabilityMinor: *v = p.minor; return cudaSuccess;
        default: emu_fail("cudaDeviceGetAttribute(%d): attribute not emulated", (int)a);
    }
}
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* a, const void* f) {
    memset(a, 0, sizeof *a);
    auto it = emu::g_max_dynamic_smem.find(f);
    a->maxDynamicSharedSizeBytes = it == emu::g_max_dynamic_smem.end() ? 0 : it->second;
    a->maxThreadsPerBlock = 1024;
    const emu::Target& t = emu::target();
    a->binaryVersion = a->ptxVersion = t.major * 10 + t.minor;
    return cudaSuccess;
}
cudaError_t cudaFuncSetAttribute(const void* f, cudaFuncAttribute attr, int value) {
    if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize)
        emu_fail("cudaFuncSetAttribute(%d): attribute not emulated", (int)attr);
    if (value < 0 || (size_t)value > emu::target().smem_optin) return err(cudaErrorInvalidValue);
    emu::g_max_dynamic_smem[f] = value;
    return cudaSuccess;
}
cudaError_t cudaGetLastError() { cudaError_t e = g_last_error; g_last_error = cudaSuccess; return e; }
cudaError_t cudaPeekAtLastError() { return g_last_error; }
const char* cudaGetErrorString(cudaError_t e) {
    switch (e) {
        case cudaSuccess: return "no error";
        case cudaErrorMemoryAllocation: return "out of memory";
        case cudaErrorInvalidValue: return "invalid argument";
        case cudaErrorInvalidDevice: return "invalid device ordinal";
        case cudaErrorInvalidResourceHandle: return "invalid resource handle";
        case cudaErrorStreamCaptureUnsupported: return "operation not permitted when stream is capturing";
        case cudaErrorStreamCaptureInvalidated: return "operation failed due to a previous error during capture";
        case cudaErrorNotReady: return "device not ready";
        default: return "unknown error (emulated)";
    }
}
const char* cudaGetErrorName(cudaError_t e) { return cudaGetErrorString(e); }

cudaError_t cudaMalloc(void** p, size_t bytes) {
    if (g_capturing) {  // cudaStreamCaptureModeGlobal: allocation is a prohibited "unsafe" call while capturing
        fprintf(stderr, "cuda emulator: cudaMalloc(%zu bytes) while a stream is being captured\n", bytes);
        *p = nullptr;
        return err(cudaErrorStreamCaptureUnsupported);
    }
    if (g_alloc_bytes + bytes > TOTAL_MEMORY) { *p = nullptr; return err(cudaErrorMemoryAllocation); }
    void* q = nullptr;
    if (posix_memalign(&q, 256, bytes ? bytes : 1)) { *p = nullptr; return err(cudaErrorMemoryAllocation); }
    g_allocs[q] = bytes;
    g_alloc_bytes += bytes;
    *p = q;
    return cudaSuccess;
}
cudaError_t cudaFree(void* p) {
    if (!p) return cudaSuccess;
    if (g_capturing) {
        fprintf(stderr, "cuda emulator: cudaFree(%p) while a stream is being captured\n", p);
        return err(cudaErrorStreamCaptureUnsupported);
    }
    auto it = g_allocs.find(p);
    if (it == g_allocs.end()) emu_fail("cudaFree(%p): not a pointer cudaMalloc returned (or freed twice)", p);
    g_alloc_bytes -= it->second;
    g_allocs.erase(it);
    free(p);
    return cudaSuccess;
}
// PGOLF_EMU_LEAK_CHECK=1: at exit, page-locked buffers and graph executables the program never freed are
// reported on stderr (a program's teardown frees them; the tests grep for the line).
static void leak_report() {
    if (g_host_allocs.empty() && g_graph_execs == 0) return;
    fprintf(stderr, "cuda emulator: at exit %zu page-locked buffers (%zu bytes) and %ld graph executables were "
            "never freed\n", g_host_allocs.size(), g_host_alloc_bytes, g_graph_execs);
}
static void leak_check_arm() {
    static bool armed = false;
    const char* e = getenv("PGOLF_EMU_LEAK_CHECK");
    if (armed || !e || strcmp(e, "1")) return;
    armed = true;
    atexit(leak_report);
}
cudaError_t cudaMallocHost(void** p, size_t bytes) {
    leak_check_arm();
    *p = malloc(bytes ? bytes : 1);
    if (!*p) return err(cudaErrorMemoryAllocation);
    g_host_allocs[*p] = bytes;
    g_host_alloc_bytes += bytes;
    return cudaSuccess;
}
cudaError_t cudaFreeHost(void* p) {
    if (!p) return cudaSuccess;
    auto it = g_host_allocs.find(p);
    if (it == g_host_allocs.end())
        emu_fail("cudaFreeHost(%p): not a pointer cudaMallocHost returned (or freed twice)", p);
    g_host_alloc_bytes -= it->second;
    g_host_allocs.erase(it);
    free(p);
    return cudaSuccess;
}
cudaError_t cudaMemGetInfo(size_t* fr, size_t* tot) {
    *tot = TOTAL_MEMORY;
    *fr = TOTAL_MEMORY - g_alloc_bytes;
    return cudaSuccess;
}

static cudaError_t sync_check(const char* what) {
    if (g_capturing) {
        fprintf(stderr, "cuda emulator: %s while a stream is being captured\n", what);
        return err(cudaErrorStreamCaptureUnsupported);
    }
    return cudaSuccess;
}
cudaError_t cudaMemcpy(void* dst, const void* src, size_t n, cudaMemcpyKind) {
    if (cudaError_t e = sync_check("cudaMemcpy")) return e;
    if (n) emu_counts().copies++;
    if (n) memmove(dst, src, n);
    return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t n, cudaMemcpyKind, cudaStream_t s) {
    if (n) emu_counts().copies++;
    if (n) emu_stream_submit(s, [dst, src, n]() { memmove(dst, src, n); });
    return cudaSuccess;
}
cudaError_t cudaMemset(void* p, int v, size_t n) {
    if (cudaError_t e = sync_check("cudaMemset")) return e;
    if (n) emu_counts().memsets++;
    if (n) memset(p, v, n);
    return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t s) {
    if (n) emu_counts().memsets++;
    if (n) emu_stream_submit(s, [p, v, n]() { memset(p, v, n); });
    return cudaSuccess;
}

cudaError_t cudaStreamCreate(cudaStream_t* s) { *s = new CUstream_st; return cudaSuccess; }
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned) { *s = new CUstream_st; return cudaSuccess; }
cudaError_t cudaStreamDestroy(cudaStream_t s) { delete s; return cudaSuccess; }
cudaError_t cudaStreamSynchronize(cudaStream_t s) {
    if (s && s->capture) return err(cudaErrorStreamCaptureUnsupported);
    return sync_check("cudaStreamSynchronize");
}
cudaError_t cudaStreamQuery(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaDeviceSynchronize() { return sync_check("cudaDeviceSynchronize"); }
cudaError_t cudaStreamBeginCapture(cudaStream_t s, cudaStreamCaptureMode) {
    if (!s || s->capture) return err(cudaErrorInvalidValue);
    s->capture = new CUgraph_st;
    g_capturing++;
    return cudaSuccess;
}
cudaError_t cudaStreamEndCapture(cudaStream_t s, cudaGraph_t* g) {
    if (!s || !s->capture) return err(cudaErrorInvalidValue);
    *g = s->capture;
    s->capture = nullptr;
    g_capturing--;
    return cudaSuccess;
}
cudaError_t cudaStreamIsCapturing(cudaStream_t s, cudaStreamCaptureStatus* st) {
    *st = s && s->capture ? cudaStreamCaptureStatusActive : cudaStreamCaptureStatusNone;
    return cudaSuccess;
}
cudaError_t cudaGraphInstantiate(cudaGraphExec_t* e, cudaGraph_t g, unsigned long long) {
    *e = new CUgraphExec_st{g->work};
    g_graph_execs++;
    return cudaSuccess;
}
cudaError_t cudaGraphLaunch(cudaGraphExec_t e, cudaStream_t s) {
    emu_counts().graph_launches++;
    for (auto& w : e->work) emu_stream_submit(s, w);
    return cudaSuccess;
}
cudaError_t cudaGraphDestroy(cudaGraph_t g) { delete g; return cudaSuccess; }
cudaError_t cudaGraphExecDestroy(cudaGraphExec_t e) {
    if (e) g_graph_execs--;
    delete e;
    return cudaSuccess;
}

cudaError_t cudaEventCreate(cudaEvent_t* e) { *e = new CUevent_st; return cudaSuccess; }
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned) { *e = new CUevent_st; return cudaSuccess; }
cudaError_t cudaEventDestroy(cudaEvent_t e) { delete e; return cudaSuccess; }
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s) {
    emu_stream_submit(s, [e]() {
        e->ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
    });
    return cudaSuccess;
}
cudaError_t cudaEventSynchronize(cudaEvent_t) { return sync_check("cudaEventSynchronize"); }
cudaError_t cudaEventQuery(cudaEvent_t) { return cudaSuccess; }
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t a, cudaEvent_t b) {
    *ms = (float)(b->ms - a->ms);
    return cudaSuccess;
}
cudaError_t cudaStreamWaitEvent(cudaStream_t, cudaEvent_t, unsigned) { return cudaSuccess; }
}  // extern "C"

// Objects the program keeps until exit (cuBLASLt plans, the context) are not leaks worth a failure.
extern "C" const char* __asan_default_options() { return "detect_leaks=0"; }
