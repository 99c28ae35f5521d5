/* The native runtime's parts, shared between its files (not part of the public API, llmc.h). */
#ifndef LLMC_INTERNAL_H
#define LLMC_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "json.h"
#include "llmc.h"

#define ALIGN 64
#define MAX_DIMS 8

/* ---- errors: one message per thread, set where a call fails (llmc_last_error) ---- */
void set_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
const char *get_error(void);
void clear_error(void);

/* ---- the tensor ABI of TVM's kernel libraries (DLPack tensors in tvm-ffi's packed calls) ---- */
typedef struct { int32_t device_type, device_id; } DLDevice;
typedef struct { uint8_t code, bits; uint16_t lanes; } DLDataType;
typedef struct {
    void *data;
    DLDevice device;
    int32_t ndim;
    DLDataType dtype;
    int64_t *shape, *strides;
    uint64_t byte_offset;
} DLTensor;
typedef struct {
    int32_t type_index;
    uint32_t zero_padding;
    union { int64_t v_int64; void *v_ptr; };
} TVMFFIAny;
enum { FFI_NONE = 0, FFI_INT = 1, FFI_DLTENSOR = 7 };
typedef int (*kernel_fn)(void *self, const TVMFFIAny *args, int32_t num_args, TVMFFIAny *result);

/* ---- the kernels' thread pool and the hooks a TVM kernel library calls (pool.c) ---- */
/* Once per process; returns the threads used (later: at most the first's). Workers spin
 * `spin_us` microseconds for the next launch before they sleep. */
int pool_start(int threads, int64_t spin_us);
#define DEFAULT_SPIN_US 1000
void pool_use(int threads);   /* the threads that take tasks from now on: a model's count */
/* Fill a kernel library's hook slots (parallel launch, workspace); -1 naming a missing slot. */
int pool_install_hooks(void *library, const char *path);

/* ---- plan dims: integers or polynomials over atoms, an atom an expression over the run-time
 * dims (dims.c; the Python runtime's dims.py) ---- */
enum { DIM_BATCH, DIM_SEQ, DIM_PAST, DIM_TOTAL, DIM_BLOCKS, N_RUNTIME_DIMS };  /* blocks: a paged cache's pool */
typedef struct { int op; int64_t value; int a, b; } dim_node;
typedef struct {
    dim_node *nodes;
    int n_nodes, cap_nodes;
    char **texts;  /* each atom's text, and the root of its tree */
    int *roots;
    int n_atoms, cap_atoms;
} dim_atoms;
typedef struct { int64_t coeff; int n; int atoms[4]; } dim_term;
typedef struct { int64_t constant; int n_terms; dim_term *terms; } dim;

/* The atom for `text`, parsed once; -1 with the error set for text that is no expression. */
int dims_atom(dim_atoms *t, const char *text);
/* A plan dim from its JSON (an integer, or [[coefficient, [atom, ...]], ...]). */
int dims_read(dim_atoms *t, const json *j, dim *out, const char *where);
void dims_eval_atoms(const dim_atoms *t, const int64_t env[N_RUNTIME_DIMS], int64_t *values);
int64_t dims_value(const dim *d, const int64_t *atom_values);
void dims_free(dim_atoms *t);

/* ---- sampling (sample.c; the Python runtime's sampling.py, to the bit) ---- */
typedef struct { uint64_t s[4]; } rng;
void rng_seed(rng *r, uint64_t seed);
double rng_uniform(rng *r);
/* The next token from `n` logits; scratch holds 3 * n doubles and n ints. */
int sample_token(const float *logits, int n, rng *r, double temperature, int top_k, double top_p,
                 double *scratch, int *order);

/* ---- the artifact (artifact.c): opened and verified as the Python runtime's open_artifact does ---- */
#define FORMAT "llmc-artifact"
#define FORMAT_VERSION 6
#define WEIGHTS "weights.safetensors"
typedef struct {
    char *dir;        /* the artifact's directory */
    char *text;       /* manifest.json */
    json *manifest;
    char *where;      /* the manifest's path, for messages */
} artifact;
int artifact_open(artifact *a, const char *path);
void artifact_close(artifact *a);
/* `rel` inside the artifact, as a new string. */
char *artifact_file(const artifact *a, const char *rel);

/* Field access naming the field's path on failure (`field` sets the error and returns NULL). */
const json *field(const json *obj, const char *key, enum json_type type, const char *where);
double now_seconds(void);

#endif
