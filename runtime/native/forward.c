/* One forward step: the feeds written, then each step's kernel called on its arguments, the
 * values viewed at the step's shape from the front of their place (and at the plan's view where
 * the step gives one); a decode step allocates nothing. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model.h"

static int fail_at_step(int i) {
    char why[1024];
    snprintf(why, sizeof why, "%s", get_error());
    set_error("plans.forward[%d]: %s", i, why);
    return -1;
}

static int64_t elements(const int64_t *shape, int ndim) {
    int64_t n = 1;
    for (int d = 0; d < ndim; d++) n *= shape[d];
    return n;
}

int model_forward(llmc_model *m, const int32_t *ids, int seq, int past, int last_logits, const float **out,
               double *kernel_seconds) {
    int64_t env[N_RUNTIME_DIMS] = {1, seq, past, past + seq, m->blocks};
    int64_t last_env[N_RUNTIME_DIMS] = {1, 1, past, past + seq, m->blocks};
    dims_eval_atoms(&m->atoms, env, m->atom_env);
    dims_eval_atoms(&m->atoms, last_env, m->atom_last);
    last_logits = last_logits && seq > 1 && m->last_only;
    /* the feeds: token ids, a mask of ones, positions past.. */
    const int feeds[3] = {m->tokens, m->mask, m->positions};
    for (int f = 0; f < 3; f++) {
        if (feeds[f] < 0) continue;
        value *v = &m->values[feeds[f]];
        int n = f == 1 ? past + seq : seq;
        for (int i = 0; i < n; i++) {
            int64_t x = f == 0 ? ids[i] : f == 1 ? 1 : past + i;
            switch (v->itemsize * 16 + v->dtype.code) {
            case 8 * 16 + 0: ((int64_t *)v->data)[i] = x; break;
            case 4 * 16 + 0: ((int32_t *)v->data)[i] = (int32_t)x; break;
            case 4 * 16 + 2: ((float *)v->data)[i] = (float)x; break;
            case 1 * 16 + 6: case 1 * 16 + 0: case 1 * 16 + 1: ((uint8_t *)v->data)[i] = (uint8_t)x; break;
            default:
                set_error("%s: plans.values['%s']: a %s feed is not supported", m->art.where, v->name, v->dtype_name);
                return -1;
            }
        }
    }
    if (m->page_tokens) {  /* the one sequence's blocks, in order, and its length */
        const value *table = &m->values[m->block_table];
        int64_t n = dims_value(&table->shape[1], m->atom_env);
        for (int64_t b = 0; b < n; b++) ((int32_t *)table->data)[b] = (int32_t)b;
        *(int32_t *)m->values[m->lengths].data = past;
    }
    double in_kernels = 0;
    for (int i = 0; i < m->n_steps; i++) {
        step *s = &m->steps[i];
        int last = last_logits && s->writes_logits;
        if (last && s->kind != KIND_LINEAR) {
            set_error("the logits come from a %s kernel; only a GEMM computes them per position", MODEL_KINDS[s->kind]);
            return -1;
        }
        const int64_t *atoms = last ? m->atom_last : m->atom_env;
        for (int a = 0; a < s->nargs; a++) {
            DLTensor *t = &s->tensors[a];
            int64_t *shape = s->shapes[a];
            const value *v = &m->values[s->args[a]];
            t->data = v->data;
            t->dtype = v->dtype;
            t->ndim = v->ndim;
            const int64_t *at = v->where == IN_CACHE ? m->atom_cache : (last && a == s->nargs - 1) ? m->atom_last
                                                                                                 : m->atom_env;
            for (int d = 0; d < v->ndim; d++) shape[d] = dims_value(&v->shape[d], at);
            if (v->where == IN_WEIGHTS) continue;
            if (last && a < s->nargs - 1) {  /* the last position's row of [b, s, k] */
                if (t->ndim == 3) {
                    t->data = (uint8_t *)t->data + (size_t)(shape[1] - 1) * (size_t)shape[2] * (size_t)v->itemsize;
                    shape[1] = shape[2];
                    shape[0] = 1;
                    t->ndim = 2;
                }
                continue;
            }
            if (s->view_ndim[a] >= 0) {  /* the plan's view of the same bytes */
                int64_t n = elements(shape, t->ndim);
                t->ndim = s->view_ndim[a];
                for (int d = 0; d < t->ndim; d++) shape[d] = dims_value(&s->views[a][d], at);
                if (elements(shape, t->ndim) != n) {
                    set_error("plans.forward[%d].views[%d]: the view of '%s' holds %lld elements, the value %lld", i, a,
                              v->name, (long long)elements(shape, t->ndim), (long long)n);
                    return -1;
                }
            }
        }
        if (llmc_kernels_run(m->kernels, &s->call, 1, atoms, &in_kernels)) return fail_at_step(i);
    }
    *kernel_seconds = in_kernels;
    /* the last position's logits */
    const value *v = &m->values[m->logits];
    size_t rows = 1;
    for (int d = 0; d < v->ndim - 1; d++) rows *= (size_t)dims_value(&v->shape[d], last_logits ? m->atom_last : m->atom_env);
    *out = (const float *)v->data + (rows - 1) * (size_t)m->vocab;
    return 0;
}

