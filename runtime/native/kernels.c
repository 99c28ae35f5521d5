/* A kernel library (TVM's, for a CPU) loaded without TVM: its hooks filled with this runtime's
 * thread pool and workspace (pool.c), its kernels found by name; and calls run in order. The
 * native executor (model.c) and the Python runtime's (runtime/executor.py, through ctypes) both
 * run their plans here, so that both use one loader, one thread pool and one set of checks. */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

struct llmc_kernels {
    void *library;
    kernel_fn *fns;
    char **names;
    int n, threads;
};

static kernel_fn *kernels_open(const char *path, const char *const *names, int n, void **library) {
    /* The kernels call TVMFFIErrorSetRaisedFromCStrParts, defined here. In llmc-run it is
     * exported (-rdynamic); where this code is a library an app loaded with RTLD_LOCAL (ctypes,
     * JNI), its symbols are promoted to global first, so that the kernel library finds it. */
    Dl_info self;
    void *own = dladdr((void *)kernels_open, &self) && self.dli_fname
                    ? dlopen(self.dli_fname, RTLD_NOW | RTLD_NOLOAD | RTLD_GLOBAL) : NULL;
    if (own) dlclose(own);  /* the promotion stays */
    *library = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!*library) {
        set_error("%s: cannot load the kernel library (%s)", path, dlerror());
        return NULL;
    }
    kernel_fn *fns = calloc((size_t)n + 1, sizeof *fns);
    if (!fns) {
        set_error("out of memory");
        return NULL;
    }
    if (pool_install_hooks(*library, path)) {
        free(fns);
        return NULL;
    }
    for (int i = 0; i < n; i++) {
        char symbol[600];
        snprintf(symbol, sizeof symbol, "__tvm_ffi_%s", names[i]);
        if (!(fns[i] = (kernel_fn)dlsym(*library, symbol))) {
            set_error("kernels.functions: '%s' is not in the kernel library %s", names[i], path);
            free(fns);
            return NULL;
        }
    }
    return fns;
}

llmc_kernels *llmc_kernels_load(const char *library, const char *const *names, int n_names, int threads) {
    if (!library || !names || n_names < 0) {
        set_error("llmc_kernels_load: no library or names");
        return NULL;
    }
    if (threads < 1 || threads > 1024) {
        set_error("threads %d: must be between 1 and 1024", threads);
        return NULL;
    }
    llmc_kernels *k = calloc(1, sizeof *k);
    if (!k) {
        set_error("out of memory");
        return NULL;
    }
    k->names = calloc((size_t)n_names + 1, sizeof *k->names);
    for (int i = 0; k->names && i < n_names; i++)
        if ((k->names[i] = strdup(names[i] ? names[i] : ""))) k->n++;
    if (k->n < n_names) {
        set_error("out of memory");
        llmc_kernels_free(k);
        return NULL;
    }
    if (!(k->fns = kernels_open(library, names, n_names, &k->library))) {
        llmc_kernels_free(k);
        return NULL;
    }
    int64_t spin = DEFAULT_SPIN_US;
    const char *text = getenv("LLMC_SPIN_US");
    if (text && *text) {
        char *end;
        long long v = strtoll(text, &end, 10);
        if (*end || v < 0 || v > 1000000) {
            set_error("LLMC_SPIN_US=%s: expected the microseconds the kernels' threads wait for work before "
                      "they sleep, from 0 (at once) to 1000000", text);
            llmc_kernels_free(k);
            return NULL;
        }
        spin = v;
    }
    k->threads = pool_start(threads, spin);
    return k;
}

int llmc_kernels_threads(const llmc_kernels *k) { return k ? k->threads : 0; }

int llmc_kernels_run(llmc_kernels *k, const llmc_call *calls, int n_calls, const int64_t *dims, double *seconds) {
    pool_use(k->threads);
    for (int i = 0; i < n_calls; i++) {
        const llmc_call *c = &calls[i];
        if (c->kernel < 0 || c->kernel >= k->n || c->n_dims > c->n_args) {
            set_error("call %d: kernel %d of %d, %d dims of %d arguments", i, c->kernel, k->n, c->n_dims, c->n_args);
            return -(i + 1);
        }
        TVMFFIAny *args = c->args;
        for (int d = 0; d < c->n_dims; d++) args[c->n_args - c->n_dims + d].v_int64 = dims[c->dim_slots[d]];
        TVMFFIAny result = {0};
        double start = seconds ? now_seconds() : 0;
        clear_error();  /* a refusal without a message must not show an older one */
        if (k->fns[c->kernel](NULL, args, c->n_args, &result)) {
            char why[1024];
            snprintf(why, sizeof why, "%s", get_error());
            set_error("kernel '%s' refused its arguments: %s", k->names[c->kernel], why[0] ? why : "(no message)");
            return -(i + 1);
        }
        if (seconds) seconds[i] += now_seconds() - start;
    }
    return 0;
}

void llmc_kernels_free(llmc_kernels *k) {
    if (!k) return;
    free(k->fns);
    for (int i = 0; i < k->n; i++) free(k->names[i]);
    free(k->names);
    if (k->library) dlclose(k->library);
    free(k);
}
