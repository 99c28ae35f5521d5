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

#ifdef __cplusplus
}
#endif
#endif
