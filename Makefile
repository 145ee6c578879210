# pgolf build.   make            ./train_gpt (nvcc: sm_80 + sm_90 code, compute_90 PTX) and ./tokenize
#                make test       build everything and run every test
#                make test-cpu   build the tests with g++ alone and run every one that needs no CUDA path (fast)
#                make cpu        ./train_gpt_cpu: the CPU-only build (g++), quick to compile
#                make submission build/submission/train_gpt.cu: the stripped single file, and its counted
#                                form build/submission/train_gpt.sh (xz, self-extracting: scripts/make_sfx)
#                make emu        tests/test_main_emu and ./train_gpt_emu: the CUDA path on the CPU (tests/emu)
# Knobs: GPU_ARCH=fat (or one arch: sm_90a, sm_80, ...), USE_MPI=auto|0|1, USE_NCCL=auto|0|1, USE_BROTLI=auto|0|1,
#        CPU_ARCH=native (train_gpt_cpu only), DEBUG=1

NVCC      ?= nvcc
CXX       ?= g++
GPU_ARCH  ?= fat
CPU_ARCH  ?= native
USE_MPI   ?= auto
USE_NCCL  ?= auto
USE_BROTLI ?= auto
CUDA_HOME ?= $(patsubst %/bin/nvcc,%,$(shell command -v $(NVCC) 2>/dev/null))

ifeq ($(DEBUG),1)
  OPT := -O0 -g
  NVOPT := -O0 -g -lineinfo
else
  OPT := -O3
  NVOPT := -O3
endif

# --- optional features, each decision printed once ------------------------------------------
ifeq ($(USE_MPI),auto)
  USE_MPI := $(if $(shell command -v mpicxx 2>/dev/null),1,0)
endif
ifeq ($(USE_MPI),1)
  MPI_CFLAGS := $(shell mpicxx --showme:compile 2>/dev/null || mpicxx -show 2>/dev/null | tr ' ' '\n' | grep '^-I' | tr '\n' ' ')
  MPI_LIBS   := $(shell mpicxx --showme:link 2>/dev/null || mpicxx -show 2>/dev/null | tr ' ' '\n' | grep -E '^-(L|l|Wl)' | tr '\n' ' ')
  MPI_DEFS   := -DPGOLF_MPI
endif
# brotli: COMPRESSOR=brotli for the artifact's groups (Debian libbrotli-dev); without it, zstd only
ifeq ($(USE_BROTLI),auto)
  USE_BROTLI := $(if $(wildcard /usr/include/brotli/encode.h),1,0)
endif
ifeq ($(USE_BROTLI),1)
  BROTLI_DEFS := -DPGOLF_BROTLI
  BROTLI_LIBS := -lbrotlienc -lbrotlidec
endif
ifeq ($(USE_NCCL),auto)
  USE_NCCL := $(if $(or $(wildcard $(CUDA_HOME)/include/nccl.h),$(wildcard /usr/include/nccl.h)),1,0)
endif
ifeq ($(USE_NCCL),1)
  NCCL_DEFS := -DPGOLF_NCCL
  NCCL_LIBS := -lnccl
endif

# --- GPU code: one binary for A100 and H100 class GPUs -------------------------------------------
# fat: sm_80 and sm_90 machine code plus compute_90 PTX, which the driver compiles for newer GPUs.
# (The kernels use mma.sync, ldmatrix and cp.async, all sm_80 features: nothing needs sm_90a.)
ifeq ($(GPU_ARCH),fat)
  GPU_CODE       := -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
                    -gencode arch=compute_90,code=compute_90
  GPU_CODE_NAMES := sm_80 sm_90 compute_90 (PTX)
else
  GPU_CODE       := -arch=$(GPU_ARCH)
  GPU_CODE_NAMES := $(GPU_ARCH)
endif

# --- the byte-counted code: every source compiled into train_gpt ------------------------------
CODE_FILES  := train_gpt.cu tokenizer/spm_model.h
CODE_BYTES  := $(shell cat $(CODE_FILES) 2>/dev/null | wc -c)
SUBMISSION  := build/submission/train_gpt.cu
SFX         := build/submission/train_gpt.sh
STRIP_BYTES  = $(shell [ -f $(SUBMISSION) ] && wc -c < $(SUBMISSION) || echo 0)
SFX_BYTES    = $(shell [ -f $(SFX) ] && wc -c < $(SFX) || echo 0)
STRIP_SUM    = $(shell [ -f $(SUBMISSION) ] && sha256sum $(SUBMISSION) | cut -c1-16 || echo unknown)
CODE_DEFS    = -DPGOLF_CODE_BYTES=$(CODE_BYTES) -DPGOLF_CODE_BYTES_STRIPPED=$(STRIP_BYTES) -DPGOLF_CODE_CHECKSUM=\"$(STRIP_SUM)\" \
               -DPGOLF_CODE_BYTES_SFX=$(SFX_BYTES)

comma       := ,
# ./train_gpt's host code is built for any x86-64 (it runs on whatever node it is copied to);
# the CPU reference, built and run here, uses this CPU's instructions.
HOST_FLAGS  := -fopenmp -Wall -Wextra
CPU_FLAGS   := $(HOST_FLAGS) -march=$(CPU_ARCH)
NVFLAGS     := $(NVOPT) -std=c++17 $(GPU_CODE) -x cu -Xcompiler "$(subst $() ,$(comma),$(HOST_FLAGS))" \
               $(MPI_DEFS) $(MPI_CFLAGS) $(NCCL_DEFS) $(BROTLI_DEFS)
LIBS        := -lcublasLt -lcublas -lzstd $(BROTLI_LIBS) -lgomp $(NCCL_LIBS) $(MPI_LIBS)
TU_DEPS     := train_gpt.cu tokenizer/spm_model.h

.PHONY: all test test-cpu cpu submission clean corpus info emu print-gpu-code
all: info train_gpt tokenize

info:
	@echo "pgolf: nvcc $(shell $(NVCC) --version 2>/dev/null | grep -o 'release [0-9.]*') ($(NVCC)), GPU code: $(GPU_CODE_NAMES)" \
	      "MPI=$(USE_MPI) NCCL=$(USE_NCCL) BROTLI=$(USE_BROTLI) code_bytes=$(CODE_BYTES) stripped=$(STRIP_BYTES)"
	@[ "$(USE_MPI)" = 1 ] || echo "pgolf: building without MPI (single process); install libopenmpi-dev for mpirun -np N"

train_gpt: $(TU_DEPS) $(SUBMISSION) $(SFX)
	$(NVCC) $(NVFLAGS) $(CODE_DEFS) -o $@ train_gpt.cu $(LIBS)

# The CPU reference alone (no CUDA): the same file through g++.
cpu: train_gpt_cpu
train_gpt_cpu: $(TU_DEPS) $(SUBMISSION) $(SFX)
	$(CXX) $(OPT) -std=c++17 -x c++ $(CPU_FLAGS) $(MPI_DEFS) $(MPI_CFLAGS) $(BROTLI_DEFS) $(CODE_DEFS) -o $@ train_gpt.cu -lzstd $(BROTLI_LIBS) \
	    $(MPI_LIBS)

# nvcc's code-generation flags (tests/test_cuda_build.sh builds the submission with them)
print-gpu-code:
	@echo $(GPU_CODE)

tokenize: tokenizer/tokenize.cpp tokenizer/spm_model.h tokenizer/spm_encode.h tokenizer/caseops.h
	$(CXX) -O2 -std=c++17 -Wall -Wextra -o $@ tokenizer/tokenize.cpp

# --- the submission: one file, CPU reference sections and comments removed -------------------
# The counted code is $(SFX): that file xz-compressed behind a short sh header that unpacks, builds
# and runs it (scripts/make_sfx); `sh build/submission/train_gpt.sh` on the GPU machine.
submission: $(SUBMISSION) $(SFX)
$(SUBMISSION): $(TU_DEPS) scripts/strip_source
	@mkdir -p build/submission
	python3 scripts/strip_source train_gpt.cu $@
$(SFX): $(SUBMISSION) scripts/make_sfx
	python3 scripts/make_sfx $(SUBMISSION) $@ $(CODE_BYTES)

# --- tests ------------------------------------------------------------------------------------
tests/test_tokenizer: tests/test_tokenizer.cpp tests/harness.h tokenizer/spm_model.h tokenizer/spm_encode.h tokenizer/caseops.h
	$(CXX) -O2 -std=c++17 -Wall -Wextra -Itests -o $@ tests/test_tokenizer.cpp

# The CUDA emulator's library shims (cuBLASLt, CUB, NCCL over MPI), under AddressSanitizer; g++ only,
# against the CUDA toolkit's headers (built only where they are).
CUDA_INC       := $(or $(CUDA_HOME),/usr/local/cuda)/include
EMU_LIBS_TEST  := $(if $(wildcard $(CUDA_INC)/cuda_runtime.h),tests/test_emu_libs)
tests/test_emu_libs: tests/test_emu_libs.cpp tests/harness.h $(wildcard tests/emu/*.h)
	$(CXX) -O1 -g -std=c++17 -Wall -Wextra -fsanitize=address,undefined -Itests -I$(CUDA_INC) \
	    $(MPI_DEFS) -DOMPI_SKIP_MPICXX $(MPI_CFLAGS) -o $@ tests/test_emu_libs.cpp $(MPI_LIBS)

# The same test program through g++ alone: the CPU reference's tests (the CUDA ones need nvcc or the emulator).
tests/test_main_cpu: tests/test_main.cu tests/harness.h $(wildcard tests/*.cuh) $(TU_DEPS)
	$(CXX) -O2 -std=c++17 -x c++ $(CPU_FLAGS) -Wno-unused-function -I. $(MPI_DEFS) $(MPI_CFLAGS) $(BROTLI_DEFS) \
	    -DPGOLF_CODE_BYTES=$(CODE_BYTES) -o $@ tests/test_main.cu -lzstd $(BROTLI_LIBS) $(MPI_LIBS)

tests/test_main: tests/test_main.cu tests/harness.h $(wildcard tests/*.cuh) $(TU_DEPS)
	$(NVCC) $(NVFLAGS) -Xcompiler -Wno-unused-function -I. -DPGOLF_CODE_BYTES=$(CODE_BYTES) -o $@ tests/test_main.cu $(LIBS)

# The CUDA path on the CPU: train_gpt.cu's kernels through the emulator in tests/emu (fibers per CUDA
# thread, shared-memory race and uninitialized-read checks, launch limits; AddressSanitizer over the
# whole program). The shared-memory checks need clang++'s load/store callbacks: no silent g++ fallback.
EMU_CXX     ?= clang++
ifeq ($(shell command -v $(EMU_CXX) 2>/dev/null),)
  $(if $(filter test emu train_gpt_emu tests/test_main_emu,$(or $(MAKECMDGOALS),all)),\
    $(error the CUDA emulator needs $(EMU_CXX) (Debian package clang): run scripts/setup))
endif
EMU_COV     := $(if $(findstring clang,$(EMU_CXX)),-fsanitize-coverage=func$(comma)trace-loads$(comma)trace-stores \
               -fsanitize-coverage-allowlist=tests/emu/checked_functions.txt -fsanitize-ignorelist=tests/emu/asan_ignore.txt)
EMU_FLAGS   := -O1 -std=c++17 -fopenmp -fsanitize=address -fno-omit-frame-pointer -Wall -Wextra -Wno-unused-function -Wno-format-security \
               -I. -I$(CUDA_HOME)/include -DPGOLF_EMU $(MPI_DEFS) $(MPI_CFLAGS) $(NCCL_DEFS) $(BROTLI_DEFS)
EMU_LIBS    := -fsanitize=address -fopenmp -lzstd $(BROTLI_LIBS) $(MPI_LIBS)
EMU_DEPS    := $(wildcard tests/emu/*.h) $(wildcard tests/emu/*.txt) tests/emu/emu_runtime.o
# built only where the CUDA headers are (the emulator uses their types and declarations)
EMU_TESTS   := $(if $(wildcard $(CUDA_HOME)/include/cuda_runtime.h),tests/test_main_emu)

tests/emu/emu_runtime.o: tests/emu/emu_runtime.cpp $(wildcard tests/emu/*.h)
	$(EMU_CXX) $(EMU_FLAGS) -O2 -c -o $@ tests/emu/emu_runtime.cpp

tests/test_main_emu: tests/test_main.cu tests/harness.h $(wildcard tests/*.cuh) $(TU_DEPS) $(EMU_DEPS)
	$(EMU_CXX) $(EMU_FLAGS) $(EMU_COV) -x c++ -DPGOLF_CODE_BYTES=$(CODE_BYTES) -c -o tests/test_main_emu.o tests/test_main.cu
	$(EMU_CXX) -o $@ tests/test_main_emu.o tests/emu/emu_runtime.o $(EMU_LIBS)

# The whole program through the emulator: DEVICE=cuda runs the CUDA path on the CPU (slowly; it checks, it does not time).
train_gpt_emu: $(TU_DEPS) $(SUBMISSION) $(EMU_DEPS)
	$(EMU_CXX) $(EMU_FLAGS) $(EMU_COV) -x c++ $(CODE_DEFS) -c -o train_gpt_emu.o train_gpt.cu
	$(EMU_CXX) -o $@ train_gpt_emu.o tests/emu/emu_runtime.o $(EMU_LIBS)

# The stripped submission with the emulator's hooks kept (scripts/strip_source --emu), through the emulator:
# on a machine without a GPU, tests/test_cuda_build.sh checks that it trains like the full source.
SUBMISSION_EMU := build/submission/train_gpt_emu
$(SUBMISSION_EMU): $(TU_DEPS) scripts/strip_source $(EMU_DEPS)
	@mkdir -p build/submission
	python3 scripts/strip_source --emu train_gpt.cu $@.cu
	$(EMU_CXX) $(EMU_FLAGS) $(EMU_COV) -x c++ $(CODE_DEFS) -c -o $@.o $@.cu
	$(EMU_CXX) -o $@ $@.o tests/emu/emu_runtime.o $(EMU_LIBS)

emu: $(EMU_TESTS) $(if $(EMU_TESTS),train_gpt_emu)

corpus: tokenize
	@scripts/make_corpus
	@scripts/make_corpus --vocab 8192

test: all train_gpt_cpu tests/test_main $(EMU_TESTS) $(if $(EMU_TESTS),train_gpt_emu) tests/test_tokenizer $(EMU_LIBS_TEST) \
      corpus
	@tests/run.sh

# The fork's loop: no nvcc, no emulator; every test of the CPU path (tests/run.sh --cpu NAME runs some).
test-cpu: train_gpt_cpu tokenize tests/test_main_cpu tests/test_tokenizer corpus
	@tests/run.sh --cpu

clean:
	rm -rf train_gpt train_gpt_cpu tokenize tests/test_main tests/test_main_cpu tests/test_tokenizer tests/test_emu_libs build \
	       tests/test_main_emu tests/test_main_emu.o tests/emu/emu_runtime.o train_gpt_emu train_gpt_emu.o
