# shellcheck shell=bash
# Shared by the run scripts (scripts/baseline, pr467, pr600, pr456, quickstart): pick the device,
# build, find data and tokenizer, launch train_gpt. Sourced, not run:
#
#   . "$(dirname "$0")/lib_run.sh"
#   pg_start pr467 "$@"                     # KEY=VALUE arguments, device, build
#   pg_cpu_defaults BIGRAM_VOCAB_SIZE=2048  # CPU only: the tiny shape plus these, where unset
#   pg_launch                               # data, tokenizer, OUT_DIR, then exec train_gpt
#
# Settings are train_gpt's env vars (the reference's names); whatever the user set, in the
# environment or as KEY=VALUE arguments, wins over anything a script would choose.
#
#   DEVICE=cuda|cpu|auto   auto (default): cuda when nvidia-smi lists a GPU, else cpu
#   NPROC=N                ranks (default: every visible GPU; 1 on the CPU); N > 1 runs mpirun
#   DATA_PATH, TOKENIZER_PATH, DOWNLOAD=1 (fetch FineWeb when absent), TRAIN_SHARDS (default 80)
#   RUN_ID, OUT_DIR        default <preset>_<date>_<time> and runs/RUN_ID
#   LOAD_ARTIFACT=path     evaluate that artifact instead of training (only val shards needed)
#   TRAIN_GPT=path         run this binary instead of building ./train_gpt or ./train_gpt_cpu
#   DRY_RUN=1              print the command and stop
set -euo pipefail

PG_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$PG_ROOT"
PG_NAME=$(basename "$0")
PG_PRESET=""
PG_VOCAB=1024  # the tokenizer of the data the recipe trains on (scripts/frontier: 8192)

pg_die() { echo "$PG_NAME: error: $*" >&2; exit 1; }
pg_say() { echo "$PG_NAME: $*" >&2; }

# The calling script's header comment, for --help.
pg_usage() { sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; }

# pg_start PRESET ARGS...: settings from the arguments, CONFIG=PRESET, the device, the binary.
pg_start() {
    PG_PRESET=$1; shift
    pg_args "$@"
    if [ -n "${CONFIG:-}" ] && [ "$CONFIG" != "$PG_PRESET" ]; then
        pg_say "CONFIG=$CONFIG ignored: this script runs CONFIG=$PG_PRESET"
    fi
    export CONFIG=$PG_PRESET
    pg_choose_device
    pg_build
}

# pg_args ARGS...: KEY=VALUE arguments become settings (exported); --help prints the header.
pg_args() {
    local a
    for a in "$@"; do
        case "$a" in
            -h|--help) pg_usage; exit 0 ;;
            [A-Z]*=*)
                [[ "${a%%=*}" =~ ^[A-Z][A-Z0-9_]*$ ]] || pg_die "argument \"$a\": expected KEY=VALUE with an upper-case setting name"
                export "${a?}" ;;
            *) pg_die "argument \"$a\": expected KEY=VALUE settings (e.g. SEED=1337), see --help" ;;
        esac
    done
    # what the user set, before any default of ours: launch.txt records it as the recipe command
    PG_USER_SET=$(env | sed -n 's/^\([A-Z][A-Z0-9_]*\)=.*/\1/p' | sort)
}

pg_gpu_count() {
    if [ -n "${CUDA_VISIBLE_DEVICES+x}" ]; then  # the ranks see only these
        local v=${CUDA_VISIBLE_DEVICES// /}
        [ -z "$v" ] || [ "$v" = "-1" ] && { echo 0; return; }
        echo $(( $(tr -cd ',' <<<"$v" | wc -c) + 1 ))
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true
    else
        echo 0
    fi
}

pg_choose_device() {
    local ngpu; ngpu=$(pg_gpu_count)
    case "${DEVICE:-auto}" in
        cuda) [ "$ngpu" -gt 0 ] || pg_die "DEVICE=cuda but no GPU is visible (nvidia-smi -L lists none)" ;;
        cpu) ;;
        auto)
            if [ "$ngpu" -gt 0 ] && { [ -n "${TRAIN_GPT:-}" ] || [ -x train_gpt ] || command -v "${NVCC:-nvcc}" >/dev/null 2>&1; }; then
                DEVICE=cuda
            else
                [ "$ngpu" -gt 0 ] && pg_say "$ngpu GPU(s) but no nvcc to build ./train_gpt"
                DEVICE=cpu
                pg_say "running on the CPU (DEVICE=cpu)${PG_PRESET:+: the $PG_PRESET algorithm at the tiny shape}"
            fi ;;
        *) pg_die "DEVICE=$DEVICE: expected cuda, cpu or auto" ;;
    esac
    export DEVICE
    if [ "$DEVICE" = cuda ]; then PG_NPROC=${NPROC:-$ngpu}; else PG_NPROC=${NPROC:-1}; fi
    [[ "$PG_NPROC" =~ ^[1-9][0-9]*$ ]] || pg_die "NPROC=$PG_NPROC: expected a positive integer"
    if [ "$DEVICE" = cuda ] && [ "$PG_NPROC" -gt "$ngpu" ]; then
        pg_die "NPROC=$PG_NPROC but only $ngpu GPU(s) are visible"
    fi
}

pg_build() {
    if [ -n "${TRAIN_GPT:-}" ]; then
        [ -x "$TRAIN_GPT" ] || pg_die "TRAIN_GPT=$TRAIN_GPT is not an executable file"
        PG_BIN=$TRAIN_GPT
        return
    fi
    local target=train_gpt
    [ "$DEVICE" = cpu ] && target=train_gpt_cpu
    if ! make -s "$target" >&2; then
        pg_die "build failed (make $target); scripts/setup installs what the build needs"
    fi
    PG_BIN=./$target
}

pg_on_cpu() { [ "$DEVICE" = cpu ]; }

# pg_default NAME VALUE: export NAME=VALUE unless NAME is already set (by the user or earlier).
pg_default() { [ -n "${!1+x}" ] || export "$1=$2"; }

# pg_cpu_defaults NAME=VALUE...: on the CPU, the tiny preset's shape and lengths and then these
# recipe-specific values, each only where unset. The preset's algorithm (optimizers, averaging,
# QAT, quantization, eval modes, TTT kind) is left as it is; only sizes and lengths shrink.
# With LOAD_ARTIFACT the shape is the artifact's: only evaluation lengths are set.
pg_cpu_defaults() {
    pg_on_cpu || return 0
    local kv
    for kv in NUM_LAYERS=4 MODEL_DIM=128 NUM_HEADS=4 NUM_KV_HEADS=2 \
              TRAIN_SEQ_LEN=256 TRAIN_BATCH_TOKENS=8192 ITERATIONS=300 WARMDOWN_ITERS=100 \
              MAX_WALLCLOCK_SECONDS=0 MUON_MOMENTUM_WARMUP_STEPS=100 \
              VAL_LOSS_EVERY=100 TRAIN_LOG_EVERY=25 VAL_TOKENS_LIMIT=131072 \
              EVAL_BATCH_SEQS=16 \
              TTT_EVAL_SEQ_LEN=256 TTT_CHUNK_SIZE=64 TTT_BATCH_SIZE=16 TTT_CHUNK_TOKENS=4096 TTT_BATCH_SEQS=8 \
              "$@"; do
        if [ -n "${LOAD_ARTIFACT:-}" ] && ! [[ "$kv" =~ ^(VAL_TOKENS_LIMIT|EVAL_[A-Z_]*|TTT_[A-Z_]*)= ]]; then continue; fi
        pg_default "${kv%%=*}" "${kv#*=}"
    done
}

# pg_has_shards DIR: val shards, and train shards unless only evaluating (LOAD_ARTIFACT)
pg_has_shards() {
    compgen -G "$1/fineweb_val_*.bin" >/dev/null && { [ -n "${LOAD_ARTIFACT:-}" ] || compgen -G "$1/fineweb_train_*.bin" >/dev/null; }
}

# Data, first found: DATA_PATH; FineWeb in data/datasets/fineweb10B_sp$PG_VOCAB; DOWNLOAD=1 fetches it;
# else the embedded Debian prose corpus (scripts/make_corpus --vocab $PG_VOCAB).
pg_data() {
    local fw=data/datasets/fineweb10B_sp$PG_VOCAB corpus=data/datasets/debian_prose_sp$PG_VOCAB
    if [ -n "${DATA_PATH:-}" ]; then
        local want="fineweb_train_*.bin and fineweb_val_*.bin"
        [ -n "${LOAD_ARTIFACT:-}" ] && want="fineweb_val_*.bin"
        pg_has_shards "$DATA_PATH" || pg_die "DATA_PATH=$DATA_PATH: expected $want shards there"
    elif pg_has_shards "$fw"; then
        DATA_PATH=$fw
    elif [ "${DOWNLOAD:-0}" = 1 ]; then
        scripts/download_fineweb --variant "sp$PG_VOCAB" --train-shards "${TRAIN_SHARDS:-80}" >&2 ||
            pg_die "scripts/download_fineweb failed"
        DATA_PATH=$fw
    else
        make -s tokenize >&2 || pg_die "build failed (make tokenize, needed by scripts/make_corpus)"
        if [ "$PG_VOCAB" != 1024 ]; then  # the sp1024 build makes the text the others re-tokenize
            scripts/make_corpus >&2 || pg_die "scripts/make_corpus failed; set DATA_PATH or DOWNLOAD=1"
        fi
        scripts/make_corpus --vocab "$PG_VOCAB" >&2 ||
            pg_die "scripts/make_corpus --vocab $PG_VOCAB failed; set DATA_PATH to FineWeb shards or DOWNLOAD=1"
        DATA_PATH=$corpus
        if [ "$DEVICE" = cuda ]; then
            pg_say "WARNING: no FineWeb shards ($fw): training on the Debian prose corpus;" \
                   "its val_bpb is not comparable with the challenge's (DOWNLOAD=1 fetches FineWeb)"
        fi
    fi
    export DATA_PATH
    export TOKENIZER_PATH=${TOKENIZER_PATH:-data/tokenizers/fineweb_${PG_VOCAB}_bpe.model}
    [ -f "$TOKENIZER_PATH" ] || pg_die "TOKENIZER_PATH=$TOKENIZER_PATH: no such file"
}

# Setting names the binary knows (its `settings` table), to forward them to every rank.
pg_setting_names() {
    "$PG_BIN" settings 2>/dev/null | sed -n 's/^| `\([A-Z][A-Z0-9_]*\)` |.*/\1/p'
}

# Words joined for a shell: plain ones as they are, others quoted by printf %q.
pg_quote() {
    local out="" w
    for w in "$@"; do
        if [[ "$w" =~ ^[A-Za-z0-9_=,./:+@%-]+$ ]]; then out+="${out:+ }$w"
        else out+="${out:+ }$(printf '%q' "$w")"; fi
    done
    echo "$out"
}

pg_launch() {
    if [ -n "${LOAD_ARTIFACT:-}" ] && [ ! -f "$LOAD_ARTIFACT" ]; then pg_die "LOAD_ARTIFACT=$LOAD_ARTIFACT: no such file"; fi
    pg_data
    # OpenMP threads that spin while waiting make a loaded machine ~10x slower (measured: 72 s vs 5 s
    # for the same short run at load 7 on 2 cores); sleeping costs little when the machine is idle
    if pg_on_cpu; then pg_default OMP_WAIT_POLICY passive; fi
    export RUN_ID=${RUN_ID:-${PG_PRESET}_$(date +%Y%m%d_%H%M%S)}
    export OUT_DIR=${OUT_DIR:-runs/$RUN_ID}
    if [ -e "$OUT_DIR/log.txt" ] && [ -z "${RESUME:-}" ] && [ "${DRY_RUN:-0}" != 1 ]; then
        pg_die "OUT_DIR=$OUT_DIR already holds a run (log.txt); choose another RUN_ID or OUT_DIR, or set RESUME=CHECKPOINT to continue it"
    fi

    # every setting in force from the environment, forwarded explicitly (mpirun -x) and recorded
    local names=() n
    while read -r n; do [ -n "$n" ] && [ -n "${!n+x}" ] && names+=("$n"); done < <( (echo CONFIG; pg_setting_names) | sort -u)
    local assigns=()
    for n in "${names[@]}"; do assigns+=("$n=${!n}"); done
    local cmd=()
    if [ "$PG_NPROC" -gt 1 ]; then
        command -v mpirun >/dev/null 2>&1 || pg_die "NPROC=$PG_NPROC needs mpirun (openmpi-bin; scripts/setup installs it), or set NPROC=1"
        cmd=(mpirun -np "$PG_NPROC" --bind-to none)
        [ "$(id -u)" -eq 0 ] && cmd+=(--allow-run-as-root)
        [ "$DEVICE" = cpu ] && cmd+=(--oversubscribe)
        for n in "${names[@]}"; do cmd+=(-x "$n"); done
        for n in $(env | sed -n 's/^\(NCCL_[A-Z0-9_]*\|OMP_[A-Z_]*\|CUDA_VISIBLE_DEVICES\)=.*/\1/p'); do cmd+=(-x "$n"); done
    fi
    cmd+=("$PG_BIN")

    # the recipe as the user gave it: the script plus the settings they chose
    local user=()
    for n in "${names[@]}"; do
        case "$n" in CONFIG|RUN_ID|OUT_DIR) continue ;; esac
        grep -qx "$n" <<<"$PG_USER_SET" && user+=("$n=${!n}")
    done
    local recipe command
    recipe="scripts/$PG_NAME${user[*]+ $(pg_quote "${user[@]}")}"
    command="$(pg_quote "${assigns[@]}") $(pg_quote "${cmd[@]}")"
    pg_say "DATA_PATH=$DATA_PATH TOKENIZER_PATH=$TOKENIZER_PATH OUT_DIR=$OUT_DIR device=$DEVICE ranks=$PG_NPROC"
    pg_say "$command"
    [ "${DRY_RUN:-0}" = 1 ] && exit 0
    mkdir -p "$OUT_DIR"
    printf 'recipe: %s\ncommand: %s\n' "$recipe" "$command" > "$OUT_DIR/launch.txt.tmp"
    mv "$OUT_DIR/launch.txt.tmp" "$OUT_DIR/launch.txt"
    exec "${cmd[@]}"
}
