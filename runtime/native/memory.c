/* Memory: the weights read from the weights file into memory (huge pages), the KV caches, one
 * buffer per layer's keys or values at the artifact's longest context (`present` names the same
 * buffer as its `past`; a paged cache's pool holds the blocks of the one sequence, in order), and
 * one arena for the activations, planned by lifetime (greedy by size, as the Python runtime's
 * memory.py: values never alive together share bytes). */
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "model.h"

/* Buffers are not cleared: every value is written before it is read (the Python runtime's are
 * numpy.empty too), and pages never touched (the logits rows a last-position prefill skips, the
 * cache beyond the context used) then take no memory. */
static void *aligned_alloc64(size_t n) {
    void *p = NULL;
    return posix_memalign(&p, ALIGN, n ? n : ALIGN) ? NULL : p;
}

static size_t round_up(size_t n) { return (n + ALIGN - 1) / ALIGN * ALIGN; }


static size_t value_bytes(const value *v, const int64_t *atoms) {
    size_t n = (size_t)v->itemsize;
    for (int d = 0; d < v->ndim; d++) {
        int64_t x = dims_value(&v->shape[d], atoms);
        n *= x > 0 ? (size_t)x : 0;
    }
    return n;
}

int model_map_weights(llmc_model *m) {
    char *path = artifact_file(&m->art, WEIGHTS);
    int fd = path ? open(path, O_RDONLY) : -1;
    struct stat st;
    if (fd < 0 || fstat(fd, &st) || st.st_size < 8) {
        set_error("%s: cannot read the weights", path ? path : WEIGHTS);
        if (fd >= 0) close(fd);
        free(path);
        return -1;
    }
    m->weights_size = (size_t)st.st_size;
    /* read into anonymous memory in huge pages where the kernel offers them: a decode step
     * streams every weight, and a file map's 4 KiB pages cost a TLB miss each (runtime/safetensors.py) */
    m->weights_map = mmap(NULL, m->weights_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m->weights_map == MAP_FAILED) {
        m->weights_map = NULL;
        close(fd);
        set_error("%s: cannot allocate %zu bytes for the weights", path, m->weights_size);
        free(path);
        return -1;
    }
#ifdef MADV_HUGEPAGE
    madvise(m->weights_map, m->weights_size, MADV_HUGEPAGE);
#endif
    size_t done = 0;
    while (done < m->weights_size) {
        ssize_t n = pread(fd, (uint8_t *)m->weights_map + done, m->weights_size - done, (off_t)done);
        if (n <= 0) break;
        done += (size_t)n;
    }
    close(fd);
    if (done < m->weights_size) {
        set_error("%s: cannot read the weights (%zu of %zu bytes)", path, done, m->weights_size);
        free(path);
        return -1;
    }
    const uint8_t *base = m->weights_map;
    uint64_t header_len = 0;
    for (int i = 7; i >= 0; i--) header_len = header_len << 8 | base[i];
    char why[200];
    json *header = header_len <= m->weights_size - 8 ? json_parse((const char *)base + 8, header_len, why, sizeof why)
                                                      : NULL;
    if (!header || header->type != JSON_OBJECT) {
        set_error("%s: not a safetensors file (%s)", path, header ? "the header is not an object" :
                  header_len > m->weights_size - 8 ? "the header does not fit in the file" : why);
        json_free(header);
        free(path);
        return -1;
    }
    static const struct { const char *code, *dtype; } CODES[] = {
        {"F32", "float32"}, {"F16", "float16"}, {"I64", "int64"}, {"I32", "int32"}, {"I16", "int16"},
        {"I8", "int8"}, {"U8", "uint8"}, {"BOOL", "bool"}};
    const json *names = json_get(m->art.manifest, "plans") ? json_get(json_get(m->art.manifest, "plans"), "weights")
                                                          : NULL;
    int rc = 0;
    for (size_t i = 0; names && i < names->count && !rc; i++) {
        const json *n = &names->items[i];
        int vi = n->type == JSON_STRING ? model_lookup(m, n->string) : -1;
        if (vi < 0) {
            set_error("%s: plans.weights[%zu]: not described in plans.values", m->art.where, i);
            rc = -1;
            break;
        }
        value *v = &m->values[vi];
        const json *t = json_get(header, n->string);
        const json *dt = t ? json_get(t, "dtype") : NULL, *shape = t ? json_get(t, "shape") : NULL;
        const json *off = t ? json_get(t, "data_offsets") : NULL;
        if (!t || !dt || dt->type != JSON_STRING || !shape || shape->type != JSON_ARRAY || !off
            || off->type != JSON_ARRAY || off->count != 2 || !off->items[0].is_int || !off->items[1].is_int) {
            set_error("%s: plans.weights[%zu]: '%s' is not in %s", m->art.where, i, n->string, WEIGHTS);
            rc = -1;
            break;
        }
        const char *dtype = NULL;
        for (size_t c = 0; c < sizeof CODES / sizeof CODES[0]; c++)
            if (!strcmp(CODES[c].code, dt->string)) dtype = CODES[c].dtype;
        int same = dtype && !strcmp(dtype, v->dtype_name) && (int)shape->count == v->ndim;
        size_t nbytes = (size_t)v->itemsize;
        for (int d = 0; same && d < v->ndim; d++) {
            const json *s = &shape->items[d];
            same = s->is_int && v->shape[d].n_terms == 0 && s->integer == v->shape[d].constant;
            nbytes *= same ? (size_t)s->integer : 0;
        }
        if (!same) {
            set_error("%s: plans.values['%s']: the weights file holds it as another dtype or shape", m->art.where,
                      n->string);
            rc = -1;
            break;
        }
        uint64_t start = 8 + header_len + (uint64_t)off->items[0].integer;
        if (off->items[0].integer < 0 || off->items[1].integer - off->items[0].integer != (int64_t)nbytes
            || start + nbytes > m->weights_size) {
            set_error("%s: tensor '%s' needs bytes beyond the file's %zu (truncated?)", path, n->string,
                      m->weights_size);
            rc = -1;
            break;
        }
        if (start % ALIGN) {
            set_error("%s: tensor '%s' is not 64-byte aligned (not written by llmc)", path, n->string);
            rc = -1;
            break;
        }
        v->where = IN_WEIGHTS;
        v->data = (uint8_t *)m->weights_map + start;
    }
    json_free(header);
    free(path);
    return rc;
}

typedef struct { size_t start, end; int first, last; } placed;
static const llmc_model *order_model;
static int by_size(const void *a, const void *b) {  /* largest first, then lifetime, then name */
    const value *x = &order_model->values[*(const int *)a], *y = &order_model->values[*(const int *)b];
    if (x->size != y->size) return x->size > y->size ? -1 : 1;
    if (x->first != y->first) return x->first < y->first ? -1 : 1;
    if (x->last != y->last) return x->last < y->last ? -1 : 1;
    return strcmp(x->name, y->name);
}
static int by_start(const void *a, const void *b) {
    const placed *x = a, *y = b;
    if (x->start != y->start) return x->start < y->start ? -1 : 1;
    if (x->end != y->end) return x->end < y->end ? -1 : 1;
    if (x->first != y->first) return x->first < y->first ? -1 : 1;
    return (x->last > y->last) - (x->last < y->last);
}

/* memory.py's arena plan: offsets greedy by size at the lowest free aligned offset. */
int model_plan_memory(llmc_model *m) {
    int64_t longest[N_RUNTIME_DIMS] = {1, m->max_seq, m->max_seq, m->max_seq, m->blocks};
    int64_t *atoms = calloc((size_t)m->atoms.n_atoms + 1, sizeof *atoms);
    int *order = calloc((size_t)m->n_values + 1, sizeof *order);
    placed *done = calloc((size_t)m->n_values + 1, sizeof *done), *overlap = calloc((size_t)m->n_values + 1, sizeof *done);
    size_t *offsets = calloc((size_t)m->n_values + 1, sizeof *offsets);
    if (!atoms || !order || !done || !overlap || !offsets) { set_error("out of memory"); return -1; }
    dims_eval_atoms(&m->atoms, longest, atoms);
    int64_t cache_env[N_RUNTIME_DIMS] = {1, 0, m->max_seq, m->max_seq, m->blocks};
    dims_eval_atoms(&m->atoms, cache_env, m->atom_cache);
    int n = 0;
    for (int i = 0; i < m->n_values; i++) {
        value *v = &m->values[i];
        if (v->where == IN_CACHE) {
            v->size = value_bytes(v, m->atom_cache);
            m->cache_bytes += round_up(v->size);
        } else if (v->where == IN_ARENA) {
            v->size = value_bytes(v, atoms);
            order[n++] = i;
        }
    }
    order_model = m;
    qsort(order, (size_t)n, sizeof *order, by_size);
    size_t arena = 0;
    for (int k = 0; k < n; k++) {
        value *v = &m->values[order[k]];
        size_t size = round_up(v->size), offset = 0;
        int o = 0;
        for (int j = 0; j < k; j++)
            if (done[j].first <= v->last && v->first <= done[j].last) overlap[o++] = done[j];
        qsort(overlap, (size_t)o, sizeof *overlap, by_start);
        for (int j = 0; j < o; j++) {
            if (overlap[j].start >= offset + size) break;
            if (overlap[j].end > offset) offset = overlap[j].end;
        }
        offsets[order[k]] = offset;
        done[k] = (placed){offset, offset + size, v->first, v->last};
        if (offset + size > arena) arena = offset + size;
    }
    m->arena_bytes = arena;
    m->arena = aligned_alloc64(arena);
    m->caches = aligned_alloc64(m->cache_bytes);
    if (!m->arena || !m->caches) {
        set_error("cannot allocate %.2f GiB for the KV caches and activations",
                  (double)(m->arena_bytes + m->cache_bytes) / (1 << 30));
        return -1;
    }
    size_t at = 0;
    for (int i = 0; i < m->n_values; i++) {
        value *v = &m->values[i];
        if (v->where == IN_ARENA) v->data = m->arena + offsets[i];
        if (v->where == IN_CACHE) { v->data = m->caches + at; at += round_up(v->size); }
    }
    free(atoms); free(order); free(done); free(overlap); free(offsets);
    return 0;
}

