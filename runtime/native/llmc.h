/* llmc native runtime: load a compiled .llmc artifact (a CPU target) and generate tokens.
 * C11; depends on libc, libm, pthreads and the dynamic loader only. Android (JNI) and iOS
 * (Swift) code can bind to these functions directly.
 *
 *   llmc_model *m = llmc_load("model.llmc", 0);           // 0 threads: every core
 *   if (!m) { fprintf(stderr, "%s\n", llmc_last_error()); ... }
 *   llmc_sampling s = llmc_greedy();
 *   int n = llmc_generate(m, prompt, n_prompt, 32, &s, on_token, user);
 *   llmc_free(m);
 *
 * Errors: a function that fails returns NULL or -1 and leaves a message naming the problem
 * (the file, the manifest field, the option) in llmc_last_error(), per thread. */
#ifndef LLMC_H
#define LLMC_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define LLMC_API __attribute__((visibility("default")))

typedef struct llmc_model llmc_model;

/* Sampling as the Python runtime does it: temperature 0 is greedy; top_k 0 and top_p 1 leave
 * the candidates untruncated; a seeded run gives the same tokens in both runtimes. */
typedef struct {
    double temperature;
    int top_k;
    double top_p;
    uint64_t seed;
    int seeded;  /* 0: a seed from the clock */
} llmc_sampling;

typedef struct {
    double load_seconds, prefill_seconds, decode_seconds;
    double decode_kernel_seconds;  /* of decode_seconds, the time inside kernels */
    int prompt_tokens, new_tokens, decode_steps, threads;
    size_t weights_bytes, kv_cache_bytes, activation_bytes;
    int max_seq_len, vocab_size;
} llmc_stats;

/* Called with each new token; return nonzero to stop generating. */
typedef int (*llmc_token_callback)(int32_t token, void *user);

/* Open and verify an artifact (format version, every field it uses, file sizes, checksums,
 * paths), check that this CPU can run its kernels, map its weights and load its kernels.
 * `threads`: the kernels' threads (0: every core, or LLMC_NUM_THREADS). */
LLMC_API llmc_model *llmc_load(const char *path, int threads);

LLMC_API llmc_sampling llmc_greedy(void);

/* Prefill the prompt, then decode up to `max_new_tokens` new tokens, stopping after an
 * end-of-sequence token (included). Returns the number of new tokens, or -1. */
LLMC_API int llmc_generate(llmc_model *m, const int32_t *prompt, int n_prompt, int max_new_tokens,
                  const llmc_sampling *sampling, llmc_token_callback on_token, void *user);

LLMC_API void llmc_get_stats(const llmc_model *m, llmc_stats *out);
LLMC_API void llmc_free(llmc_model *m);
LLMC_API const char *llmc_last_error(void);

/* Kernel calls: an artifact's kernel library run on this runtime's thread pool, for a caller
 * with an executor of its own (the Python runtime's, through ctypes). The caller lays out each
 * call's arguments as tvm-ffi's packed arguments (16 bytes each: DLPack tensor pointers, then
 * integers); a run writes each call's trailing dims from `dims` and calls the kernels in order.
 * The pool is one per process, started by the first load with its thread count; a later load
 * may use fewer threads, not more (llmc_kernels_threads says how many). */
typedef struct llmc_kernels llmc_kernels;

typedef struct {
    int32_t kernel;            /* index into the names given at load */
    int32_t n_args;            /* packed arguments, the dims included */
    int32_t n_dims;            /* the last n_dims arguments are integers: dims[dim_slots[i]] */
    int32_t reserved;
    void *args;                /* n_args packed arguments (tvm-ffi's TVMFFIAny) */
    const int32_t *dim_slots;
} llmc_call;

/* Load a kernel library (a path) and find `names` in it; `threads` >= 1. */
LLMC_API llmc_kernels *llmc_kernels_load(const char *library, const char *const *names, int n_names, int threads);
LLMC_API int llmc_kernels_threads(const llmc_kernels *k);
/* Run calls[0..n_calls) in order; with `seconds`, add each call's time to seconds[i]. Returns 0,
 * or -(i + 1) when call i failed (a kernel refusing its arguments), with the message set. */
LLMC_API int llmc_kernels_run(llmc_kernels *k, const llmc_call *calls, int n_calls, const int64_t *dims,
                              double *seconds);
LLMC_API void llmc_kernels_free(llmc_kernels *k);

#ifdef __cplusplus
}
#endif
#endif
