/* The C API (llmc.h): loading an artifact (manifest.c, cpu_features.c, memory.c, its kernel
 * library), generating one sequence (forward.c, sample.c), and freeing it. The Python runtime's
 * executor (runtime/executor.py, host.py, model.py) for one sequence. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "model.h"

const char *llmc_last_error(void) { return get_error(); }

static int load_kernels(llmc_model *m, int threads) {
    const json *kernels = field(m->art.manifest, "kernels", JSON_OBJECT, "manifest");
    const json *library = kernels ? field(kernels, "library", JSON_STRING, "kernels") : NULL;
    if (!library) return -1;
    if (!json_get(json_get(m->art.manifest, "files"), library->string)) {
        set_error("%s: kernels.library: '%s' is not a listed file", m->art.where, library->string);
        return -1;
    }
    const char **names = calloc((size_t)m->n_steps + 1, sizeof *names);
    char *path = artifact_file(&m->art, library->string);
    if (!names || !path) {
        set_error("out of memory");
    } else {
        for (int i = 0; i < m->n_steps; i++) names[i] = m->steps[i].kernel;
        m->kernels = llmc_kernels_load(path, names, m->n_steps, threads);
    }
    free(names);
    free(path);
    return m->kernels ? 0 : model_fail_at(m->art.where);
}


/* ---- the API ---- */

static int env_threads(void) {
    const char *vars[2] = {"LLMC_NUM_THREADS", "TVM_NUM_THREADS"};
    for (int i = 0; i < 2; i++) {
        const char *text = getenv(vars[i]);
        if (text && *text) {
            char *end;
            long n = strtol(text, &end, 10);
            if (*end || n < 1 || n > 1024) return -1;
            return (int)n;
        }
    }
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

llmc_model *llmc_load(const char *path, int threads) {
    double start = now_seconds();
    if (threads < 0 || threads > 1024) {
        set_error("threads %d: must be between 1 and 1024 (0: every core)", threads);
        return NULL;
    }
    if (!threads && (threads = env_threads()) < 0) {
        set_error("LLMC_NUM_THREADS: not a number of threads >= 1");
        return NULL;
    }
    llmc_model *m = calloc(1, sizeof *m);
    if (!m) { set_error("out of memory"); return NULL; }
    const json *plans, *kernels, *functions;
    if (artifact_open(&m->art, path) || model_check_cpu(m)) goto fail;
    plans = field(m->art.manifest, "plans", JSON_OBJECT, "manifest");
    kernels = plans ? field(m->art.manifest, "kernels", JSON_OBJECT, "manifest") : NULL;
    functions = kernels ? field(kernels, "functions", JSON_ARRAY, "kernels") : NULL;
    if (!functions) {
        model_fail_at(m->art.where);
        goto fail;
    }
    if (model_read_layout(m) || model_read_values(m, plans) || model_read_model(m) || model_read_paging(m)
        || model_read_plan(m, plans, functions))
        goto fail;
    size_t n_atoms = (size_t)m->atoms.n_atoms + 1;
    m->atom_env = calloc(n_atoms, sizeof *m->atom_env);
    m->atom_last = calloc(n_atoms, sizeof *m->atom_last);
    m->atom_cache = calloc(n_atoms, sizeof *m->atom_cache);
    m->scratch = calloc(3 * (size_t)m->vocab + 1, sizeof *m->scratch);
    m->order = calloc((size_t)m->vocab + 1, sizeof *m->order);
    if (!m->atom_env || !m->atom_last || !m->atom_cache || !m->scratch || !m->order) {
        set_error("out of memory");
        goto fail;
    }
    if (model_map_weights(m) || model_plan_memory(m) || load_kernels(m, threads)) goto fail;
    m->stats.weights_bytes = m->weights_size;
    m->stats.kv_cache_bytes = m->cache_bytes;
    m->stats.activation_bytes = m->arena_bytes;
    m->stats.max_seq_len = m->max_seq;
    m->stats.vocab_size = m->vocab;
    m->stats.threads = llmc_kernels_threads(m->kernels);
    m->stats.load_seconds = now_seconds() - start;
    return m;
fail:
    llmc_free(m);
    return NULL;
}

llmc_sampling llmc_greedy(void) { return (llmc_sampling){0.0, 0, 1.0, 0, 1}; }

static int is_eos(const llmc_model *m, int token) {
    for (int i = 0; i < m->n_eos; i++)
        if (m->eos[i] == token) return 1;
    return 0;
}

int llmc_generate(llmc_model *m, const int32_t *prompt, int n_prompt, int max_new_tokens,
                  const llmc_sampling *sampling, llmc_token_callback on_token, void *user) {
    llmc_sampling s = sampling ? *sampling : llmc_greedy();
    if (!m) { set_error("no model"); return -1; }
    if (!(s.temperature >= 0) || isinf(s.temperature)) {
        set_error("temperature %g: must be a finite number >= 0 (0: greedy)", s.temperature);
        return -1;
    }
    if (s.top_k < 0) { set_error("top-k %d: must be an integer >= 1", s.top_k); return -1; }
    if (!(s.top_p > 0 && s.top_p <= 1)) { set_error("top-p %g: must be a number in (0, 1]", s.top_p); return -1; }
    if (!prompt || n_prompt <= 0) { set_error("the prompt is empty"); return -1; }
    if (max_new_tokens < 0) { set_error("max_new_tokens %d: must be an integer >= 0", max_new_tokens); return -1; }
    if ((int64_t)n_prompt + max_new_tokens > m->max_seq) {
        set_error("prompt (%d) + max_new_tokens (%d) exceeds the context of %d tokens this artifact was compiled for",
                  n_prompt, max_new_tokens, m->max_seq);
        return -1;
    }
    for (int i = 0; i < n_prompt && m->token_bound > 0; i++)
        if (prompt[i] < 0 || prompt[i] >= m->token_bound) {
            set_error("%s: token id %d is outside the vocabulary (0..%lld)", m->values[m->tokens].name, prompt[i],
                      (long long)m->token_bound - 1);
            return -1;
        }
    rng r;
    rng_seed(&r, s.seeded ? s.seed : (uint64_t)(now_seconds() * 1e9));
    const float *logits;
    double kernels, start = now_seconds();
    m->stats.prompt_tokens = n_prompt;
    m->stats.new_tokens = m->stats.decode_steps = 0;
    m->stats.decode_seconds = m->stats.decode_kernel_seconds = 0;
    if (model_forward(m, prompt, n_prompt, 0, 1, &logits, &kernels)) return -1;
    int token = sample_token(logits, m->vocab, &r, s.temperature, s.top_k, s.top_p, m->scratch, m->order);
    m->stats.prefill_seconds = now_seconds() - start;
    int n = 0, past = n_prompt;
    while (n < max_new_tokens) {
        n++;
        m->stats.new_tokens = n;
        if ((on_token && on_token(token, user)) || is_eos(m, token) || n == max_new_tokens) break;
        int32_t id = token;
        start = now_seconds();
        if (model_forward(m, &id, 1, past, 0, &logits, &kernels)) return -1;
        token = sample_token(logits, m->vocab, &r, s.temperature, s.top_k, s.top_p, m->scratch, m->order);
        m->stats.decode_seconds += now_seconds() - start;
        m->stats.decode_kernel_seconds += kernels;
        m->stats.decode_steps++;
        past++;
    }
    return n;
}

void llmc_get_stats(const llmc_model *m, llmc_stats *out) {
    if (m && out) *out = m->stats;
}

void llmc_free(llmc_model *m) {
    if (!m) return;
    for (int i = 0; i < m->n_steps; i++) {
        step *s = &m->steps[i];
        for (int a = 0; a < s->nargs && s->views && s->view_ndim; a++)
            for (int d = 0; d < s->view_ndim[a]; d++) free(s->views[a][d].terms);
        free(s->args); free(s->dims); free(s->tensors); free(s->shapes); free(s->packed); free(s->view_ndim);
        free(s->views);
    }
    for (int i = 0; i < m->n_values; i++)
        for (int d = 0; d < m->values[i].ndim; d++) free(m->values[i].shape[d].terms);
    free(m->steps); free(m->values); free(m->table); free(m->eos);
    free(m->arena); free(m->caches); free(m->scratch); free(m->order);
    free(m->atom_env); free(m->atom_last); free(m->atom_cache);
    if (m->weights_map) munmap(m->weights_map, m->weights_size);
    llmc_kernels_free(m->kernels);
    dims_free(&m->atoms);
    artifact_close(&m->art);
    free(m);
}
