/* llmc-run: generate tokens with a compiled artifact, the native runtime's command line.
 *
 *   llmc-run model.llmc --prompt-ids 1,2,3 --max-new-tokens 32 [--threads N] [--temperature T]
 *            [--top-k K] [--top-p P] [--seed S] [--json] [--stats]
 *
 * Prints the new token ids as `llmc run --prompt-ids` does (space-separated, then a newline).
 * Bad input (options, prompt, artifact) is a message on stderr and exit status 2. */
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "llmc.h"

static const char *USAGE =
    "usage: llmc-run ARTIFACT --prompt-ids IDS [--max-new-tokens N] [--threads N] [--temperature T]\n"
    "                [--top-k K] [--top-p P] [--seed S] [--json] [--stats]\n";

static int bad(const char *fmt, const char *what) {
    fprintf(stderr, "llmc-run: error: ");
    fprintf(stderr, fmt, what);
    fprintf(stderr, "\n%s", USAGE);
    return 2;
}

static int to_long(const char *text, long lo, long hi, long *out) {
    char *end;
    errno = 0;
    long v = strtol(text, &end, 10);
    if (!*text || *end || errno || v < lo || v > hi) return -1;
    *out = v;
    return 0;
}

static int to_double(const char *text, double *out) {
    char *end;
    errno = 0;
    *out = strtod(text, &end);
    return !*text || *end || errno ? -1 : 0;
}

/* The process's peak resident memory (Linux's VmHWM), in bytes; 0 where unknown. */
static size_t peak_resident(void) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    size_t kb = 0;
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, "VmHWM:", 6)) kb = strtoull(line + 6, NULL, 10);
    if (f) fclose(f);
    return kb * 1024;
}

typedef struct { int json, count; } printer;

static int print_token(int32_t token, void *user) {
    printer *p = user;
    if (p->json) printf("%s%d", p->count ? ", " : "", token);
    else printf("%d ", token);
    p->count++;
    fflush(stdout);
    return 0;
}

int main(int argc, char **argv) {
    const char *path = NULL, *ids = NULL;
    long max_new = 32, threads = 0, top_k = 0;
    unsigned long long seed = 0;
    int seeded = 0, json = 0, stats = 0;
    double temperature = 0, top_p = 1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            fputs(USAGE, stdout);
            return 0;
        }
        if (!strcmp(a, "--json")) { json = 1; continue; }
        if (!strcmp(a, "--stats")) { stats = 1; continue; }
        if (a[0] != '-') {
            if (path) return bad("unexpected argument '%s'", a);
            path = a;
            continue;
        }
        static const char *WITH_VALUE[] = {"--prompt-ids", "--max-new-tokens", "--threads", "--temperature",
                                           "--top-k", "--top-p", "--seed"};
        int known = 0;
        for (size_t k = 0; k < sizeof WITH_VALUE / sizeof *WITH_VALUE; k++) known |= !strcmp(a, WITH_VALUE[k]);
        if (!known) return bad("unknown option '%s'", a);
        if (i + 1 >= argc) return bad("%s needs a value", a);
        const char *v = argv[++i];
        if (!strcmp(a, "--prompt-ids")) ids = v;
        else if (!strcmp(a, "--max-new-tokens")) { if (to_long(v, 0, INT_MAX, &max_new)) return bad("--max-new-tokens %s: must be an integer >= 0", v); }
        else if (!strcmp(a, "--threads")) { if (to_long(v, 1, 1024, &threads)) return bad("--threads %s: must be an integer >= 1", v); }
        else if (!strcmp(a, "--top-k")) { if (to_long(v, 1, INT_MAX, &top_k)) return bad("--top-k %s: must be an integer >= 1", v); }
        else if (!strcmp(a, "--seed")) {
            char *end;
            errno = 0;
            seed = strtoull(v, &end, 10);
            if (!*v || *end || errno || v[0] == '-') return bad("--seed %s: must be an integer from 0 to 2**64 - 1", v);
            seeded = 1;
        } else if (!strcmp(a, "--temperature")) {
            if (to_double(v, &temperature) || !(temperature >= 0) || temperature > 1e300)
                return bad("--temperature %s: must be a finite number >= 0 (0: greedy)", v);
        } else if (to_double(v, &top_p) || !(top_p > 0 && top_p <= 1)) {
            return bad("--top-p %s: must be a number in (0, 1]", v);
        }
    }
    if (!path) return bad("%s", "an artifact is required");
    if (!ids) return bad("%s", "--prompt-ids is required");
    int32_t *prompt = malloc((strlen(ids) / 2 + 2) * sizeof *prompt);
    int n = 0;
    for (const char *p = ids; prompt;) {
        char *end;
        errno = 0;
        long t = strtol(p, &end, 10);
        if (end == p || errno || t < INT32_MIN || t > INT32_MAX || (*end && *end != ',')) {
            free(prompt);
            return bad("--prompt-ids %s: expected comma-separated integer token ids, e.g. 1,2,3", ids);
        }
        prompt[n++] = (int32_t)t;
        if (!*end) break;
        p = end + 1;
    }
    llmc_model *m = llmc_load(path, (int)threads);
    if (!m) {
        fprintf(stderr, "llmc-run: error: %s\n", llmc_last_error());
        free(prompt);
        return 2;
    }
    llmc_sampling s = {temperature, (int)top_k, top_p, (uint64_t)seed, seeded};
    printer out = {json, 0};
    if (json) printf("{\"prompt_ids\": [%s], \"new_token_ids\": [", ids);
    int made = llmc_generate(m, prompt, n, (int)max_new, &s, print_token, &out);
    free(prompt);
    if (made < 0) {
        if (out.count || json) printf("\n");
        fprintf(stderr, "llmc-run: error: %s\n", llmc_last_error());
        llmc_free(m);
        return 2;
    }
    llmc_stats st;
    llmc_get_stats(m, &st);
    if (json)
        printf("], \"seconds\": %.4f}\n", st.prefill_seconds + st.decode_seconds);
    else
        printf("\n");
    if (stats) {
        double step = st.decode_steps ? st.decode_seconds / st.decode_steps : 0;
        fprintf(stderr, "load %.3f s, prefill %d tokens %.4f s, decode %d steps %.4f s (%.2f tok/s, %.3f ms/step, "
                "%.2f%% outside kernels), %d threads; weights %zu B, KV cache %zu B, activations %zu B; peak resident "
                "%zu B\n",
                st.load_seconds, st.prompt_tokens, st.prefill_seconds, st.decode_steps, st.decode_seconds,
                step > 0 ? 1 / step : 0, step * 1e3,
                st.decode_seconds > 0 ? 100 * (1 - st.decode_kernel_seconds / st.decode_seconds) : 0, st.threads,
                st.weights_bytes, st.kv_cache_bytes, st.activation_bytes, peak_resident());
    }
    llmc_free(m);
    return 0;
}
