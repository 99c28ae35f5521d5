/* The kernels' thread pool and the hooks a TVM kernel library calls, so that neither TVM's
 * runtime library nor tvm-ffi is needed.
 *
 * A kernel library has three function-pointer slots that its loader fills
 * (__TVMBackendParallelLaunch, __TVMBackendAllocWorkspace, __TVMBackendFreeWorkspace) and calls
 * one function of the loading process, TVMFFIErrorSetRaisedFromCStrParts, when a kernel refuses
 * its arguments. Parallel loops call the launch with a callback per task (task id, task count),
 * as TVM's own thread pool (src/runtime/thread_pool.cc) runs them.
 *
 * A decode step launches a few hundred parallel loops a few microseconds apart, so the workers
 * spin between launches (a futex wake-up costs tens of microseconds) and sleep only after
 * `spin_ns` without work (LLMC_SPIN_US; 0: sleep at once, as llama.cpp's --poll 0). */
#include <dlfcn.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "internal.h"

typedef struct { void *sync_handle; int32_t num_task; } parallel_env;
typedef int (*parallel_lambda)(int task_id, parallel_env *penv, void *cdata);

static struct {
    int threads;        /* workers started, the caller's thread included */
    int active;         /* of them, those that take tasks: the running model's thread count */
    pthread_t *workers;
    _Atomic uint64_t generation;  /* one per launch */
    parallel_lambda fn;
    void *cdata;
    int num_task;
    atomic_int finished, failed;
    atomic_int sleepers;
    int64_t spin_ns;    /* how long a worker spins for the next launch before it sleeps */
    pthread_mutex_t lock;
    pthread_cond_t wake;
} P = {.threads = 1, .active = 1, .lock = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER};

static _Thread_local char error_text[1024];

void set_error(const char *fmt, ...) {
    char buf[sizeof error_text];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    memcpy(error_text, buf, sizeof buf);
}

const char *get_error(void) { return error_text; }

void clear_error(void) { error_text[0] = 0; }

/* Called by a kernel that refuses its arguments (tvm-ffi's C API). */
__attribute__((visibility("default"))) void TVMFFIErrorSetRaisedFromCStrParts(const char *kind, const char **parts,
                                                                              int32_t n) {
    size_t used = (size_t)snprintf(error_text, sizeof error_text, "%s: ", kind ? kind : "Error");
    for (int32_t i = 0; i < n && used < sizeof error_text; i++)
        used += (size_t)snprintf(error_text + used, sizeof error_text - used, "%s", parts[i] ? parts[i] : "");
}

static inline void relax(void) {
#if defined(__x86_64__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ volatile("yield");
#endif
}

/* Thread i runs tasks i, i + active, ...: each thread's share is fixed, as in TVM's pool. */
static void run_tasks(int self) {
    parallel_env env = {NULL, P.num_task};
    for (int t = self; t < P.num_task && self < P.active; t += P.active)
        if (P.fn(t, &env, P.cdata)) atomic_store(&P.failed, 1);
}

static void *worker(void *arg) {
    int self = (int)(intptr_t)arg;
    uint64_t seen = 0;
    for (;;) {
        double since = now_seconds();
        for (long spins = 1; atomic_load_explicit(&P.generation, memory_order_acquire) == seen; spins++) {
            /* the clock is read every 256 pauses: a pause is tens of cycles, a clock read more */
            if (spins % 256 || (now_seconds() - since) * 1e9 < (double)P.spin_ns) { relax(); continue; }
            pthread_mutex_lock(&P.lock);
            atomic_fetch_add(&P.sleepers, 1);
            while (atomic_load(&P.generation) == seen) pthread_cond_wait(&P.wake, &P.lock);
            atomic_fetch_sub(&P.sleepers, 1);
            pthread_mutex_unlock(&P.lock);
        }
        seen = atomic_load_explicit(&P.generation, memory_order_acquire);
        run_tasks(self);
        atomic_fetch_add_explicit(&P.finished, 1, memory_order_release);
    }
    return NULL;
}

/* Every worker has left the launch before the next one starts: none can take a task of the
 * next launch while still counting the last one's. */
static int parallel_launch(parallel_lambda fn, void *cdata, int num_task) {
    if (num_task <= 0) num_task = P.active;
    if (P.active == 1 || num_task == 1) {
        parallel_env env = {NULL, num_task};
        for (int t = 0; t < num_task; t++)
            if (fn(t, &env, cdata)) return -1;
        return 0;
    }
    P.fn = fn;
    P.cdata = cdata;
    P.num_task = num_task;
    atomic_store(&P.failed, 0);
    atomic_store(&P.finished, 0);
    atomic_fetch_add(&P.generation, 1);  /* sequentially consistent: a worker going to sleep sees it, or
                                            this launch sees the worker asleep */
    if (atomic_load(&P.sleepers)) {
        pthread_mutex_lock(&P.lock);
        pthread_cond_broadcast(&P.wake);
        pthread_mutex_unlock(&P.lock);
    }
    run_tasks(0);
    while (atomic_load_explicit(&P.finished, memory_order_acquire) < P.threads - 1) relax();
    return atomic_load(&P.failed) ? -1 : 0;
}

/* Workspace: kernels allocate scratch on every call (the int8 GEMMs' quantized activations, for
 * one), stack-like. Each thread keeps its last few freed blocks for reuse, as TVM's own
 * workspace pool does: malloc and free of these sizes cost several percent of a decode step, and
 * large blocks come back from the kernel as fresh, zeroed pages. A block's size is kept in the
 * ALIGN bytes before it. */
#define CACHED_BLOCKS 8
static _Thread_local struct { uint8_t *base; size_t size; } cached[CACHED_BLOCKS];
static _Thread_local int n_cached;

static void *alloc_workspace(int device_type, int device_id, uint64_t nbytes, int code_hint, int bits_hint) {
    (void)device_type; (void)device_id; (void)code_hint; (void)bits_hint;
    size_t size = ((size_t)nbytes + ALIGN - 1) / ALIGN * ALIGN, best = 0;
    int pick = -1;
    for (int i = 0; i < n_cached; i++)
        if (cached[i].size >= size && (pick < 0 || cached[i].size < best)) { pick = i; best = cached[i].size; }
    if (pick >= 0) {
        uint8_t *base = cached[pick].base;
        cached[pick] = cached[--n_cached];
        return base + ALIGN;
    }
    void *p = NULL;
    if (posix_memalign(&p, ALIGN, size + ALIGN)) return NULL;
    *(size_t *)p = size;
    return (uint8_t *)p + ALIGN;
}

static int free_workspace(int device_type, int device_id, void *ptr) {
    (void)device_type; (void)device_id;
    if (!ptr) return 0;
    uint8_t *base = (uint8_t *)ptr - ALIGN;
    if (n_cached == CACHED_BLOCKS) {  /* drop the smallest */
        int small = 0;
        for (int i = 1; i < n_cached; i++)
            if (cached[i].size < cached[small].size) small = i;
        free(cached[small].base);
        cached[small] = cached[--n_cached];
    }
    cached[n_cached].base = base;
    cached[n_cached++].size = *(size_t *)base;
    return 0;
}

/* A forked child has the caller's thread only: its launches run serially. */
static void forked(void) {
    P.workers = NULL;
    P.threads = P.active = 1;
}

int pool_start(int threads, int64_t spin_us) {
    if (threads < 1) threads = 1;
    if (P.workers)  /* started once per process, as TVM's pool; later models may use fewer */
        return threads < P.threads ? threads : P.threads;
    P.spin_ns = spin_us * 1000;
    P.workers = calloc((size_t)threads, sizeof *P.workers);
    if (!P.workers) return 1;
    pthread_atfork(NULL, NULL, forked);
    P.threads = 1;
    for (int i = 1; i < threads; i++) {
        if (pthread_create(&P.workers[i], NULL, worker, (void *)(intptr_t)i)) break;
        P.threads++;
    }
    return P.threads;
}

void pool_use(int threads) { P.active = threads < 1 ? 1 : threads < P.threads ? threads : P.threads; }

int pool_install_hooks(void *library, const char *path) {
    static const char *slots[3] = {"__TVMBackendParallelLaunch", "__TVMBackendAllocWorkspace",
                                   "__TVMBackendFreeWorkspace"};
    void *hooks[3] = {(void *)parallel_launch, (void *)alloc_workspace, (void *)free_workspace};
    for (int i = 0; i < 3; i++) {
        void **slot = dlsym(library, slots[i]);
        if (slot) *slot = hooks[i];
        else if (i == 0) {  /* a library of serial kernels has no launch slot; the others it always has */
            continue;
        } else {
            set_error("%s: not a TVM kernel library (no %s)", path, slots[i]);
            return -1;
        }
    }
    return 0;
}
