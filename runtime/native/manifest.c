/* Reading the manifest into the model: the values (dtype, symbolic shape, where they live), the KV
 * cache's layout and entries, the roles (which inputs hold the token ids, mask and positions,
 * which output the logits), a paged cache's block tables, and the plan's steps with each
 * argument's view. Every field is checked and a bad one named (`plans.forward[3].views[1]`). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model.h"

const char *const MODEL_KINDS[] = {"linear", "attention", "rope_cache", "injective", "norm"};

static uint64_t hash(const char *s) {
    uint64_t h = 1469598103934665603ULL;
    while (*s) h = (h ^ (unsigned char)*s++) * 1099511628211ULL;
    return h;
}

int model_lookup(const llmc_model *m, const char *name) {
    for (size_t i = hash(name) & (m->table_size - 1);; i = (i + 1) & (m->table_size - 1)) {
        if (!m->table[i].name) return -1;
        if (!strcmp(m->table[i].name, name)) return m->table[i].value;
    }
}

static void insert(llmc_model *m, const char *name, int index) {
    size_t i = hash(name) & (m->table_size - 1);
    while (m->table[i].name) i = (i + 1) & (m->table_size - 1);
    m->table[i] = (struct slot){name, index};
}


static int read_dtype(const char *s, DLDataType *t, int *size) {
    static const struct { const char *name; DLDataType t; int size; } D[] = {
        {"float32", {2, 32, 1}, 4}, {"float16", {2, 16, 1}, 2}, {"int64", {0, 64, 1}, 8}, {"int32", {0, 32, 1}, 4},
        {"int16", {0, 16, 1}, 2}, {"int8", {0, 8, 1}, 1}, {"uint8", {1, 8, 1}, 1}, {"bool", {6, 8, 1}, 1}};
    for (size_t i = 0; i < sizeof D / sizeof D[0]; i++)
        if (!strcmp(s, D[i].name)) { *t = D[i].t; *size = D[i].size; return 0; }
    return -1;
}

int model_read_values(llmc_model *m, const json *plans) {
    const json *values = field(plans, "values", JSON_OBJECT, "plans");
    if (!values) return -1;
    m->n_values = (int)values->count;
    m->values = calloc(values->count + 1, sizeof *m->values);
    for (m->table_size = 16; m->table_size < 4 * values->count + 64; m->table_size *= 2) {}  /* + presents */
    m->table = calloc(m->table_size, sizeof *m->table);
    if (!m->values || !m->table) { set_error("out of memory"); return -1; }
    for (size_t i = 0; i < values->count; i++) {
        value *v = &m->values[i];
        char where[600];
        snprintf(where, sizeof where, "%s: plans.values['%.400s']", m->art.where, values->keys[i]);
        v->name = values->keys[i];
        const json *dtype = field(&values->items[i], "dtype", JSON_STRING, where);
        const json *shape = dtype ? field(&values->items[i], "shape", JSON_ARRAY, where) : NULL;
        if (!shape) return -1;
        v->dtype_name = dtype->string;
        if (read_dtype(dtype->string, &v->dtype, &v->itemsize)) {
            set_error("%s.dtype: '%s' is not a dtype this runtime knows", where, dtype->string);
            return -1;
        }
        if (shape->count > MAX_DIMS) {
            set_error("%s.shape: more than %d dims", where, MAX_DIMS);
            return -1;
        }
        v->ndim = (int)shape->count;
        for (int d = 0; d < v->ndim; d++) {
            char at[700];
            snprintf(at, sizeof at, "%s.shape[%d]", where, d);
            if (dims_read(&m->atoms, &shape->items[d], &v->shape[d], at)) return -1;
        }
        if (model_lookup(m, v->name) >= 0) continue;
        insert(m, v->name, (int)i);
    }
    return 0;
}


static int role(llmc_model *m, const json *roles, const char *key, int required) {
    const json *r = json_get(roles, key);
    if (!r || (r->type == JSON_NULL && !required)) return -1;
    if (r->type != JSON_STRING) {
        set_error("%s: model.roles.%s: expected a name", m->art.where, key);
        return -2;
    }
    int v = model_lookup(m, r->string);
    if (v < 0 && required) {
        set_error("%s: model.roles.%s: '%s' is not described in plans.values", m->art.where, key, r->string);
        return -2;
    }
    return v;  /* a feed the compiled graph never reads has no value: -1 */
}

/* The error being set, prefixed with `where` (the artifact): -1. */
int model_fail_at(const char *where) {
    char why[1024];
    snprintf(why, sizeof why, "%s", get_error());
    set_error("%s: %s", where, why);
    return -1;
}

/* The caches are allocated from plans.values whatever their axis order. A paged cache (a pool of
   `blocks` blocks of page_tokens positions, read through a block table) holds the one sequence
   this runtime generates: as many blocks as its longest context fills, the table 0, 1, 2, ...
   Read before the values, whose dims then name the pool's size. */
int model_read_layout(llmc_model *m) {
    const json *model = field(m->art.manifest, "model", JSON_OBJECT, "manifest");
    const json *max_seq = model ? field(model, "max_seq_len", JSON_NUMBER, "model") : NULL;
    const json *kv = max_seq ? field(model, "kv_cache", JSON_OBJECT, "model") : NULL;
    const json *layout = kv ? field(kv, "layout", JSON_OBJECT, "model.kv_cache") : NULL;
    const json *pages = layout ? field(layout, "page_tokens", JSON_NUMBER, "model.kv_cache.layout") : NULL;
    if (!pages) return model_fail_at(m->art.where);
    if (!pages->is_int || pages->integer < 0 || pages->integer > 4096) {
        set_error("%s: model.kv_cache.layout.page_tokens: expected an integer from 0 (contiguous) to 4096",
                  m->art.where);
        return -1;
    }
    m->page_tokens = (int)pages->integer;
    if (m->page_tokens && max_seq->is_int && max_seq->integer > 0)
        m->blocks = (int)((max_seq->integer + m->page_tokens - 1) / m->page_tokens);
    return 0;
}

/* A paged cache's block table [1, max_blocks] and lengths [1] (runtime/schema.py: KV_BLOCKS,
   KV_LENGTHS): fed at every step, like the token ids. */
int model_read_paging(llmc_model *m) {
    m->block_table = model_lookup(m, "kv_cache.blocks");
    m->lengths = model_lookup(m, "kv_cache.lengths");
    if (!m->page_tokens) return 0;
    const char *names[2] = {"kv_cache.blocks", "kv_cache.lengths"};
    const int values[2] = {m->block_table, m->lengths};
    for (int i = 0; i < 2; i++) {
        const value *v = values[i] >= 0 ? &m->values[values[i]] : NULL;
        if (!v || strcmp(v->dtype_name, "int32") || v->ndim != 2 - i) {
            set_error("%s: plans.values['%s']: a paged cache's kernels take it as int32 [batch%s]", m->art.where, names[i],
                      i ? "" : ", max_blocks");
            return -1;
        }
    }
    return 0;
}

int model_read_model(llmc_model *m) {
    const char *where = m->art.where;
    const json *model = field(m->art.manifest, "model", JSON_OBJECT, "manifest");
    const json *max_seq = model ? field(model, "max_seq_len", JSON_NUMBER, "model") : NULL;
    const json *roles = max_seq ? field(model, "roles", JSON_OBJECT, "model") : NULL;
    const json *kv = roles ? field(model, "kv_cache", JSON_OBJECT, "model") : NULL;
    const json *entries = kv ? field(kv, "entries", JSON_ARRAY, "model.kv_cache") : NULL;
    const json *eos = entries ? field(model, "eos_token_ids", JSON_ARRAY, "model") : NULL;
    const json *bounds = eos ? field(model, "index_bounds", JSON_OBJECT, "model") : NULL;
    if (!bounds) return model_fail_at(where);
    if (!max_seq->is_int || max_seq->integer < 1 || max_seq->integer > (1 << 20)) {
        set_error("%s: model.max_seq_len: expected an integer >= 1 and <= %d", where, 1 << 20);
        return -1;
    }
    m->max_seq = (int)max_seq->integer;
    if ((m->tokens = role(m, roles, "tokens", 1)) < 0 || (m->logits = role(m, roles, "logits", 1)) < 0
        || (m->mask = role(m, roles, "mask", 0)) == -2 || (m->positions = role(m, roles, "positions", 0)) == -2)
        return -1;
    const json *tokens = json_get(roles, "tokens"), *bound = json_get(bounds, tokens->string);
    m->token_bound = bound && bound->is_int ? bound->integer : -1;
    value *logits = &m->values[m->logits];
    if (strcmp(logits->dtype_name, "float32") || logits->ndim < 2 || logits->shape[logits->ndim - 1].n_terms) {
        set_error("%s: plans.values['%s']: the logits must be float32 [..., vocab]", where, logits->name);
        return -1;
    }
    m->vocab = (int)logits->shape[logits->ndim - 1].constant;
    m->n_eos = (int)eos->count;
    m->eos = calloc(eos->count + 1, sizeof *m->eos);
    for (size_t i = 0; i < eos->count; i++) {
        if (!eos->items[i].is_int || eos->items[i].integer < 0) {
            set_error("%s: model.eos_token_ids[%zu]: expected an integer >= 0", where, i);
            return -1;
        }
        m->eos[i] = (int)eos->items[i].integer;
    }
    for (size_t i = 0; i < entries->count; i++) {
        const json *past = json_get(&entries->items[i], "past"), *present = json_get(&entries->items[i], "present");
        int v = past && past->type == JSON_STRING ? model_lookup(m, past->string) : -1;
        if (v < 0 || !present || present->type != JSON_STRING) {
            set_error("%s: model.kv_cache.entries[%zu]: expected {past, present} with the past in plans.values", where, i);
            return -1;
        }
        m->values[v].where = IN_CACHE;
        if (model_lookup(m, present->string) < 0) insert(m, present->string, v);  /* the same buffer */
    }
    return 0;
}

/* step s's view of argument a (null: none) */
static int read_view(llmc_model *m, const json *j, step *s, int a, const char *where, const char *at) {
    s->view_ndim[a] = -1;
    if (j->type == JSON_NULL) return 0;
    if (j->type != JSON_ARRAY || j->count > MAX_DIMS) {
        set_error("%s: %s.views[%d]: expected null or a shape of at most %d dims", where, at, a, MAX_DIMS);
        return -1;
    }
    s->view_ndim[a] = (int)j->count;
    for (size_t d = 0; d < j->count; d++) {
        char here[700];
        snprintf(here, sizeof here, "%s: %s.views[%d][%zu]", where, at, a, d);
        if (dims_read(&m->atoms, &j->items[d], &s->views[a][d], here)) return -1;
    }
    return 0;
}

int model_read_plan(llmc_model *m, const json *plans, const json *functions) {
    const char *where = m->art.where;
    const json *forward = field(plans, "forward", JSON_ARRAY, "plans");
    if (!forward) return -1;
    if (!forward->count) {
        set_error("%s: plans.forward: the artifact has no execution plan", where);
        return -1;
    }
    m->n_steps = (int)forward->count;
    m->steps = calloc(forward->count, sizeof *m->steps);
    for (int i = 0; i < m->n_values; i++) { m->values[i].first = m->n_steps; m->values[i].last = -1; }
    for (int i = 0; i < m->n_steps; i++) {
        step *s = &m->steps[i];
        char at[64];
        snprintf(at, sizeof at, "plans.forward[%d]", i);
        const json *j = &forward->items[i];
        const json *kernel = field(j, "kernel", JSON_STRING, at), *kind = kernel ? field(j, "kind", JSON_STRING, at) : NULL;
        const json *args = kind ? field(j, "args", JSON_ARRAY, at) : NULL;
        const json *dims = args ? field(j, "dims", JSON_ARRAY, at) : NULL;
        const json *views = dims ? field(j, "views", JSON_ARRAY, at) : NULL;
        if (!views) return model_fail_at(where);
        if (views->count != args->count) {
            set_error("%s: %s.views: %zu views for %zu arguments", where, at, views->count, args->count);
            return -1;
        }
        s->kernel = kernel->string;
        s->kind = -1;
        for (int k = 0; k < 5; k++)
            if (!strcmp(kind->string, MODEL_KINDS[k])) s->kind = k;
        int known = 0;
        for (size_t f = 0; f < functions->count; f++)
            known |= functions->items[f].type == JSON_STRING && !strcmp(functions->items[f].string, s->kernel);
        if (s->kind < 0 || !known) {
            set_error("%s: %s.%s: '%s' is not %s", where, at, s->kind < 0 ? "kind" : "kernel",
                      s->kind < 0 ? kind->string : s->kernel, s->kind < 0 ? "a kind of kernel" : "a kernel of kernels.functions");
            return -1;
        }
        s->nargs = (int)args->count;
        s->ndims = (int)dims->count;
        s->args = calloc(args->count + 1, sizeof *s->args);
        s->dims = calloc(dims->count + 1, sizeof *s->dims);
        s->tensors = calloc(args->count + 1, sizeof *s->tensors);
        s->shapes = calloc(args->count + 1, sizeof *s->shapes);
        s->packed = calloc(args->count + dims->count + 1, sizeof *s->packed);
        s->view_ndim = calloc(args->count + 1, sizeof *s->view_ndim);
        s->views = calloc(args->count + 1, sizeof *s->views);
        if (!s->args || !s->dims || !s->tensors || !s->shapes || !s->packed || !s->view_ndim || !s->views) {
            set_error("out of memory");
            return -1;
        }
        s->call = (llmc_call){i, s->nargs + s->ndims, s->ndims, 0, s->packed, s->dims};
        for (int a = 0; a < s->nargs; a++) {
            const json *name = &args->items[a];
            if (name->type != JSON_STRING) {
                set_error("%s: %s.args[%d]: expected a name", where, at, a);
                return -1;
            }
            if (!name->string[0]) {  /* CPU kernels declare every parameter they take */
                set_error("%s: %s.args[%d]: an unread slot (\"\"), which only a GPU plan has", where, at, a);
                return -1;
            }
            s->args[a] = model_lookup(m, name->string);
            if (s->args[a] < 0) {
                set_error("%s: %s.args[%d]: value '%s' is not described in plans.values", where, at, a, name->string);
                return -1;
            }
            value *v = &m->values[s->args[a]];
            if (v->first > i) v->first = i;
            if (v->last < i) v->last = i;
            if (read_view(m, &views->items[a], s, a, where, at)) return -1;
            s->tensors[a].shape = s->shapes[a];
            s->tensors[a].device.device_type = 1;  /* kDLCPU */
            s->packed[a].type_index = FFI_DLTENSOR;
            s->packed[a].v_ptr = &s->tensors[a];
        }
        for (int d = 0; d < s->ndims; d++) {
            if (dims->items[d].type != JSON_STRING || (s->dims[d] = dims_atom(&m->atoms, dims->items[d].string)) < 0) {
                set_error("%s: %s.dims[%d]: expected a run-time dim or an expression over them", where, at, d);
                return -1;
            }
            s->packed[s->nargs + d].type_index = FFI_INT;
        }
        s->writes_logits = s->nargs && s->args[s->nargs - 1] == m->logits;
        if (s->writes_logits && s->kind == KIND_LINEAR) m->last_only = 1;
    }
    /* feeds are alive from before the first step, the logits to after the last */
    if (m->block_table >= 0) m->values[m->block_table].first = -1;
    if (m->lengths >= 0) m->values[m->lengths].first = -1;
    const json *inputs = json_get(json_get(m->art.manifest, "model"), "inputs");
    for (size_t i = 0; inputs && inputs->type == JSON_ARRAY && i < inputs->count; i++) {
        const json *name = json_get(&inputs->items[i], "name");
        int v = name && name->type == JSON_STRING ? model_lookup(m, name->string) : -1;
        if (v >= 0) m->values[v].first = -1;
    }
    const json *outputs = json_get(json_get(m->art.manifest, "model"), "outputs");
    const json *first = outputs && outputs->type == JSON_ARRAY && outputs->count ? json_get(&outputs->items[0], "name")
                                                                                 : NULL;
    int out = first && first->type == JSON_STRING ? model_lookup(m, first->string) : -1;
    if (out >= 0) m->values[out].last = m->n_steps;
    return 0;
}

