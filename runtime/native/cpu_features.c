/* The CPU: an artifact's kernels use the features it recorded (`cpu.features`), named as Linux
 * names them; a CPU without one of them is refused before any kernel runs. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#endif

#include "model.h"

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

int model_check_cpu(llmc_model *m) {
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

