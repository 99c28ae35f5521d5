/* The native runtime's model, shared by the files that load and run it (not part of the C API):
 * what a value and a step are, the model's state, and each file's entry points. */
#ifndef LLMC_MODEL_H
#define LLMC_MODEL_H

#include "internal.h"

enum { IN_ARENA, IN_WEIGHTS, IN_CACHE };
enum { KIND_LINEAR, KIND_ATTENTION, KIND_ROPE_CACHE, KIND_INJECTIVE, KIND_NORM };

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

/* the kinds of kernel a step names (`kind`), for messages and the logits GEMM */
extern const char *const MODEL_KINDS[];

/* manifest.c: the manifest's values, KV-cache layout, roles, paging and plan */
int model_lookup(const llmc_model *m, const char *name);
int model_fail_at(const char *where);
int model_read_layout(llmc_model *m);
int model_read_values(llmc_model *m, const json *plans);
int model_read_model(llmc_model *m);
int model_read_paging(llmc_model *m);
int model_read_plan(llmc_model *m, const json *plans, const json *functions);

/* cpu_features.c: the CPU has the features the artifact's kernels were compiled for */
int model_check_cpu(llmc_model *m);

/* memory.c: the weights read into memory; the caches and the activation arena planned */
int model_map_weights(llmc_model *m);
int model_plan_memory(llmc_model *m);

/* forward.c: one forward step of `seq` tokens after `past`; `out`: the last position's logits */
int model_forward(llmc_model *m, const int32_t *ids, int seq, int past, int last_logits, const float **out,
                  double *kernel_seconds);

#endif
