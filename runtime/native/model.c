/* Loading an artifact's plan and running it: the Python runtime's executor (runtime/executor.py,
 * memory.py, model.py), for one sequence.
 *
 * Values live in three places: the weights, read from the weights file into memory (huge pages); the KV
 * caches, one buffer per layer's keys or values at the artifact's longest context (`present`
 * names the same buffer as its `past`; a paged cache's pool holds the blocks of the one sequence,
 * in order, with the block table 0, 1, 2, ...); and one arena for the activations, planned by lifetime
 * (greedy by size, as memory.py: values never alive together share bytes). A step's tensors
 * are the values viewed at the step's shape from the front of their place; a decode step
 * allocates nothing. */
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#endif

#include "internal.h"

enum { IN_ARENA, IN_WEIGHTS, IN_CACHE };
enum { KIND_LINEAR, KIND_ATTENTION, KIND_ROPE_CACHE, KIND_INJECTIVE, KIND_NORM };
static const char *KINDS[] = {"linear", "attention", "rope_cache", "injective", "norm"};

typedef struct {
    const char *name, *dtype_name;
    DLDataType dtype;
    int itemsize, ndim, where;
    dim shape[MAX_DIMS];
    uint8_t *data;
    size_t size;        /* bytes at the longest context */
    int first, last;    /* the steps it is alive over */
} value;

typedef struct {
    llmc_call call;     /* kernel i of the library is step i's */
    const char *kernel;
    int kind, nargs, ndims, writes_logits;
    int *args;          /* value indices */
    int *dims;          /* atom indices */
    int *view_ndim;     /* per argument: the dims of its view, -1 for none (the value's own shape) */
    dim (*views)[MAX_DIMS];
    DLTensor *tensors;
    int64_t (*shapes)[MAX_DIMS];
    TVMFFIAny *packed;  /* the arguments, then the dims */
} step;

struct llmc_model {
    artifact art;
    void *weights_map;
    size_t weights_size;
    llmc_kernels *kernels;
    dim_atoms atoms;
    int64_t *atom_env, *atom_last, *atom_cache;  /* the atoms' values: this step, its last position, the caches */
    value *values;
    int n_values;
    struct slot { const char *name; int value; } *table;  /* open addressing, by name; value -1: free */
    size_t table_size;
    step *steps;
    int n_steps;
    int max_seq, tokens, mask, positions, logits, vocab, last_only;
    int page_tokens, blocks, block_table, lengths;  /* a paged cache: its pool, the two values (-1: none) */
    int64_t token_bound;
    int *eos;
    int n_eos;
    uint8_t *arena, *caches;
    size_t arena_bytes, cache_bytes;
    double *scratch;
    int *order;
    llmc_stats stats;
};

const char *llmc_last_error(void) { return get_error(); }

static uint64_t hash(const char *s) {
    uint64_t h = 1469598103934665603ULL;
    while (*s) h = (h ^ (unsigned char)*s++) * 1099511628211ULL;
    return h;
}

static int lookup(const llmc_model *m, const char *name) {
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

/* Buffers are not cleared: every value is written before it is read (the Python runtime's are
 * numpy.empty too), and pages never touched (the logits rows a last-position prefill skips, the
 * cache beyond the context used) then take no memory. */
static void *aligned_alloc64(size_t n) {
    void *p = NULL;
    return posix_memalign(&p, ALIGN, n ? n : ALIGN) ? NULL : p;
}

static size_t round_up(size_t n) { return (n + ALIGN - 1) / ALIGN * ALIGN; }

/* ---- the CPU: an artifact's kernels use its recorded features, named as Linux names them ---- */

static int has_feature(const char *name) {
#if defined(__aarch64__) && defined(__linux__)
    static const struct { const char *name; int hwcap2; unsigned long bit; } ARM[] = {
        {"fp", 0, 1UL << 0}, {"asimd", 0, 1UL << 1}, {"fphp", 0, 1UL << 9}, {"asimdhp", 0, 1UL << 10},
        {"asimddp", 0, 1UL << 20}, {"sve", 0, 1UL << 22}, {"sve2", 1, 1UL << 1}, {"i8mm", 1, 1UL << 13},
        {"bf16", 1, 1UL << 14}};
    for (size_t i = 0; i < sizeof ARM / sizeof ARM[0]; i++)
        if (!strcmp(ARM[i].name, name)) return (getauxval(ARM[i].hwcap2 ? AT_HWCAP2 : AT_HWCAP) & ARM[i].bit) != 0;
    return 0;
#else
    static char flags[8192];
    static int read_once;
    if (!read_once) {
        read_once = 1;
        FILE *f = fopen("/proc/cpuinfo", "r");
        char line[8192];
        while (f && fgets(line, sizeof line, f)) {
            if (!strncmp(line, "flags", 5)) {
                char *colon = strchr(line, ':');
                if (colon) snprintf(flags, sizeof flags, " %s", colon + 1);
                break;
            }
        }
        if (f) fclose(f);
        for (char *p = flags; *p; p++)
            if (*p == '\n' || *p == '\t') *p = ' ';
        strncat(flags, " ", sizeof flags - strlen(flags) - 1);
        if (!flags[1]) return 1;  /* no /proc/cpuinfo: nothing to check against */
    }
    if (!flags[1]) return 1;
    char key[64];
    snprintf(key, sizeof key, " %s ", name);
    return strstr(flags, key) != NULL;
#endif
}

static int check_cpu(llmc_model *m) {
    const char *where = m->art.where;
    const json *target = field(m->art.manifest, "target", JSON_OBJECT, "manifest");
    const json *kind = target ? field(target, "kind", JSON_STRING, "target") : NULL;
    if (!kind) return -1;
    if (strcmp(kind->string, "llvm")) {
        set_error("%s: target.kind: a %s artifact; the native runtime runs CPU artifacts (compile with --target "
                  "cpu or arm64)", where, kind->string);
        return -1;
    }
    const json *cpu = field(m->art.manifest, "cpu", JSON_OBJECT, "manifest");
    const json *name = cpu ? field(cpu, "name", JSON_STRING, "cpu") : NULL;
    const json *arch = cpu ? field(cpu, "arch", JSON_STRING, "cpu") : NULL;
    const json *features = cpu ? field(cpu, "features", JSON_ARRAY, "cpu") : NULL;
    if (!features) return -1;
#if defined(__x86_64__)
    const char *here = "x86_64";
#elif defined(__aarch64__)
    const char *here = "aarch64";
#else
    const char *here = "unknown";
#endif
    if (strcmp(arch->string, here)) {
        set_error("%s: compiled for %s (%s); this machine is %s", where, arch->string, name->string, here);
        return -1;
    }
    char missing[512] = "";
    for (size_t i = 0; i < features->count; i++) {
        const json *f = &features->items[i];
        if (f->type != JSON_STRING) {
            set_error("%s: cpu.features[%zu]: expected a string", where, i);
            return -1;
        }
        if (!has_feature(f->string) && strlen(missing) + strlen(f->string) + 3 < sizeof missing) {
            if (missing[0]) strcat(missing, ", ");
            strcat(missing, f->string);
        }
    }
    if (missing[0]) {
        set_error("%s: compiled for CPU '%s'; this CPU lacks %s (recompile for a CPU this one is, e.g. --cpu generic "
                  "on arm64 or --cpu x86-64-v3 on x86)", where, name->string, missing);
        return -1;
    }
    return 0;
}

/* ---- values, weights, caches and arena ---- */

static int read_dtype(const char *s, DLDataType *t, int *size) {
    static const struct { const char *name; DLDataType t; int size; } D[] = {
        {"float32", {2, 32, 1}, 4}, {"float16", {2, 16, 1}, 2}, {"int64", {0, 64, 1}, 8}, {"int32", {0, 32, 1}, 4},
        {"int16", {0, 16, 1}, 2}, {"int8", {0, 8, 1}, 1}, {"uint8", {1, 8, 1}, 1}, {"bool", {6, 8, 1}, 1}};
    for (size_t i = 0; i < sizeof D / sizeof D[0]; i++)
        if (!strcmp(s, D[i].name)) { *t = D[i].t; *size = D[i].size; return 0; }
    return -1;
}

static int read_values(llmc_model *m, const json *plans) {
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
        if (lookup(m, v->name) >= 0) continue;
        insert(m, v->name, (int)i);
    }
    return 0;
}

static size_t value_bytes(const value *v, const int64_t *atoms) {
    size_t n = (size_t)v->itemsize;
    for (int d = 0; d < v->ndim; d++) {
        int64_t x = dims_value(&v->shape[d], atoms);
        n *= x > 0 ? (size_t)x : 0;
    }
    return n;
}

static int map_weights(llmc_model *m) {
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
        int vi = n->type == JSON_STRING ? lookup(m, n->string) : -1;
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
static int plan_memory(llmc_model *m) {
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

/* ---- the model's roles, caches and plan ---- */

static int role(llmc_model *m, const json *roles, const char *key, int required) {
    const json *r = json_get(roles, key);
    if (!r || (r->type == JSON_NULL && !required)) return -1;
    if (r->type != JSON_STRING) {
        set_error("%s: model.roles.%s: expected a name", m->art.where, key);
        return -2;
    }
    int v = lookup(m, r->string);
    if (v < 0 && required) {
        set_error("%s: model.roles.%s: '%s' is not described in plans.values", m->art.where, key, r->string);
        return -2;
    }
    return v;  /* a feed the compiled graph never reads has no value: -1 */
}

/* The error being set, prefixed with `where` (the artifact): -1. */
static int fail_at(const char *where) {
    char why[1024];
    snprintf(why, sizeof why, "%s", get_error());
    set_error("%s: %s", where, why);
    return -1;
}

/* The caches are allocated from plans.values whatever their axis order. A paged cache (a pool of
   `blocks` blocks of page_tokens positions, read through a block table) holds the one sequence
   this runtime generates: as many blocks as its longest context fills, the table 0, 1, 2, ...
   Read before the values, whose dims then name the pool's size. */
static int read_layout(llmc_model *m) {
    const json *model = field(m->art.manifest, "model", JSON_OBJECT, "manifest");
    const json *max_seq = model ? field(model, "max_seq_len", JSON_NUMBER, "model") : NULL;
    const json *kv = max_seq ? field(model, "kv_cache", JSON_OBJECT, "model") : NULL;
    const json *layout = kv ? field(kv, "layout", JSON_OBJECT, "model.kv_cache") : NULL;
    const json *pages = layout ? field(layout, "page_tokens", JSON_NUMBER, "model.kv_cache.layout") : NULL;
    if (!pages) return fail_at(m->art.where);
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
static int read_paging(llmc_model *m) {
    m->block_table = lookup(m, "kv_cache.blocks");
    m->lengths = lookup(m, "kv_cache.lengths");
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

static int read_model(llmc_model *m) {
    const char *where = m->art.where;
    const json *model = field(m->art.manifest, "model", JSON_OBJECT, "manifest");
    const json *max_seq = model ? field(model, "max_seq_len", JSON_NUMBER, "model") : NULL;
    const json *roles = max_seq ? field(model, "roles", JSON_OBJECT, "model") : NULL;
    const json *kv = roles ? field(model, "kv_cache", JSON_OBJECT, "model") : NULL;
    const json *entries = kv ? field(kv, "entries", JSON_ARRAY, "model.kv_cache") : NULL;
    const json *eos = entries ? field(model, "eos_token_ids", JSON_ARRAY, "model") : NULL;
    const json *bounds = eos ? field(model, "index_bounds", JSON_OBJECT, "model") : NULL;
    if (!bounds) return fail_at(where);
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
        int v = past && past->type == JSON_STRING ? lookup(m, past->string) : -1;
        if (v < 0 || !present || present->type != JSON_STRING) {
            set_error("%s: model.kv_cache.entries[%zu]: expected {past, present} with the past in plans.values", where, i);
            return -1;
        }
        m->values[v].where = IN_CACHE;
        if (lookup(m, present->string) < 0) insert(m, present->string, v);  /* the same buffer */
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

static int read_plan(llmc_model *m, const json *plans, const json *functions) {
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
        if (!views) return fail_at(where);
        if (views->count != args->count) {
            set_error("%s: %s.views: %zu views for %zu arguments", where, at, views->count, args->count);
            return -1;
        }
        s->kernel = kernel->string;
        s->kind = -1;
        for (int k = 0; k < 5; k++)
            if (!strcmp(kind->string, KINDS[k])) s->kind = k;
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
            s->args[a] = lookup(m, name->string);
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
        int v = name && name->type == JSON_STRING ? lookup(m, name->string) : -1;
        if (v >= 0) m->values[v].first = -1;
    }
    const json *outputs = json_get(json_get(m->art.manifest, "model"), "outputs");
    const json *first = outputs && outputs->type == JSON_ARRAY && outputs->count ? json_get(&outputs->items[0], "name")
                                                                                 : NULL;
    int out = first && first->type == JSON_STRING ? lookup(m, first->string) : -1;
    if (out >= 0) m->values[out].last = m->n_steps;
    return 0;
}

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
    return m->kernels ? 0 : fail_at(m->art.where);
}

/* ---- one forward step ---- */

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

static int run(llmc_model *m, const int32_t *ids, int seq, int past, int last_logits, const float **out,
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
            set_error("the logits come from a %s kernel; only a GEMM computes them per position", KINDS[s->kind]);
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
    if (artifact_open(&m->art, path) || check_cpu(m)) goto fail;
    plans = field(m->art.manifest, "plans", JSON_OBJECT, "manifest");
    kernels = plans ? field(m->art.manifest, "kernels", JSON_OBJECT, "manifest") : NULL;
    functions = kernels ? field(kernels, "functions", JSON_ARRAY, "kernels") : NULL;
    if (!functions) {
        fail_at(m->art.where);
        goto fail;
    }
    if (read_layout(m) || read_values(m, plans) || read_model(m) || read_paging(m)
        || read_plan(m, plans, functions))
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
    if (map_weights(m) || plan_memory(m) || load_kernels(m, threads)) goto fail;
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
    if (run(m, prompt, n_prompt, 0, 1, &logits, &kernels)) return -1;
    int token = sample_token(logits, m->vocab, &r, s.temperature, s.top_k, s.top_p, m->scratch, m->order);
    m->stats.prefill_seconds = now_seconds() - start;
    int n = 0, past = n_prompt;
    while (n < max_new_tokens) {
        n++;
        m->stats.new_tokens = n;
        if ((on_token && on_token(token, user)) || is_eos(m, token) || n == max_new_tokens) break;
        int32_t id = token;
        start = now_seconds();
        if (run(m, &id, 1, past, 0, &logits, &kernels)) return -1;
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
