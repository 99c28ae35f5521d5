/* Opening an artifact, with the checks of the Python runtime (runtime/artifact.py): the
 * manifest parses, is an llmc manifest of the version this runtime reads, and was not altered
 * (its own checksum); every file it lists is relative, inside the directory, present, of the
 * listed size and checksum. The fields the native runtime uses are checked where it reads them
 * (model.c), each failure naming the field's path. */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"
#include "sha256.h"

#define MAX_MANIFEST_BYTES (64 << 20)

static const char *TYPE_NAMES[] = {"null", "a boolean", "a number", "a string", "a list", "an object"};

double now_seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

const json *field(const json *obj, const char *key, enum json_type type, const char *where) {
    const json *v = json_get(obj, key);
    if (!v) {
        set_error("%s.%s: missing", where, key);
        return NULL;
    }
    if (v->type != type) {
        set_error("%s.%s: expected %s, got %s", where, key, TYPE_NAMES[type], TYPE_NAMES[v->type]);
        return NULL;
    }
    return v;
}

char *artifact_file(const artifact *a, const char *rel) {
    size_t n = strlen(a->dir) + strlen(rel) + 2;
    char *p = malloc(n);
    if (p) snprintf(p, n, "%s/%s", a->dir, rel);
    return p;
}

static char *read_small(const char *path, size_t limit, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    struct stat st;
    if (fstat(fileno(f), &st) || (size_t)st.st_size > limit) {
        fclose(f);
        errno = EFBIG;
        return NULL;
    }
    char *text = malloc((size_t)st.st_size + 1);
    size_t n = text ? fread(text, 1, (size_t)st.st_size, f) : 0;
    fclose(f);
    if (!text || n != (size_t)st.st_size) {
        free(text);
        errno = EIO;
        return NULL;
    }
    text[n] = 0;
    *len = n;
    return text;
}

static int hash_file(const char *path, char hex[65]) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) return -1;
    static _Thread_local unsigned char buf[1 << 20];
    sha256_ctx c;
    sha256_init(&c);
    for (;;) {
        ssize_t n = read(fd, buf, sizeof buf);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) { close(fd); return -1; }
        if (n == 0) break;
        sha256_update(&c, buf, (size_t)n);
    }
    close(fd);
    sha256_hex(&c, hex);
    return 0;
}

/* A listed path: relative, no "..", and (symbolic links resolved) inside the directory. */
static int inside(const char *root, const char *rel, const char *file) {
    if (rel[0] == '/' || !rel[0]) return 0;
    for (const char *p = rel; *p;) {
        const char *e = strchr(p, '/');
        size_t n = e ? (size_t)(e - p) : strlen(p);
        if (n == 2 && p[0] == '.' && p[1] == '.') return 0;
        p += n + (e != NULL);
    }
    char real[PATH_MAX];
    if (!realpath(file, real)) return 1;  /* missing: reported as such */
    size_t n = strlen(root);
    return !strncmp(real, root, n) && real[n] == '/';
}

static int check_files(artifact *a) {
    const json *files = field(a->manifest, "files", JSON_OBJECT, "manifest");
    if (!files) return -1;
    char root[PATH_MAX];
    if (!realpath(a->dir, root)) {
        set_error("%s: %s", a->dir, strerror(errno));
        return -1;
    }
    for (size_t i = 0; i < files->count; i++) {
        const char *rel = files->keys[i];
        const json *info = &files->items[i];
        const json *bytes = json_get(info, "bytes"), *sum = json_get(info, "sha256");
        if (info->type != JSON_OBJECT || !bytes || bytes->type != JSON_NUMBER || !bytes->is_int || bytes->integer < 0
            || !sum || sum->type != JSON_STRING || strlen(sum->string) != 64) {
            set_error("%s: files['%s']: expected {bytes, sha256}", a->where, rel);
            return -1;
        }
        char *path = artifact_file(a, rel);
        if (!path) { set_error("out of memory"); return -1; }
        if (!inside(root, rel, path)) {
            set_error("%s: file '%s' lies outside the artifact (listed paths are relative, inside the artifact's "
                      "directory)", a->where, rel);
            free(path);
            return -1;
        }
        struct stat st;
        if (stat(path, &st) || !S_ISREG(st.st_mode)) {
            set_error("%s: missing (the manifest lists it)", path);
            free(path);
            return -1;
        }
        if ((int64_t)st.st_size != bytes->integer) {
            set_error("%s: %s (%lld bytes, the manifest says %lld)", path,
                      (int64_t)st.st_size < bytes->integer ? "truncated" : "longer than recorded",
                      (long long)st.st_size, (long long)bytes->integer);
            free(path);
            return -1;
        }
        char hex[65];
        if (hash_file(path, hex) || strcmp(hex, sum->string)) {
            set_error("%s: checksum mismatch (the file was altered after compilation)", path);
            free(path);
            return -1;
        }
        free(path);
    }
    return 0;
}

int artifact_open(artifact *a, const char *path) {
    memset(a, 0, sizeof *a);
    struct stat st;
    if (stat(path, &st)) {
        set_error("%s: no such artifact", path);
        return -1;
    }
    if (!S_ISDIR(st.st_mode)) {
        set_error("%s: not an llmc artifact (an artifact is a directory with manifest.json)", path);
        return -1;
    }
    a->dir = strdup(path);
    a->where = artifact_file(a, "manifest.json");
    size_t len;
    a->text = read_small(a->where, MAX_MANIFEST_BYTES, &len);
    if (!a->text) {
        set_error(errno == ENOENT ? "%s: not an llmc artifact (no manifest.json)" : "%s: cannot read it (%s)",
                  errno == ENOENT ? path : a->where, strerror(errno));
        return -1;
    }
    char why[200];
    a->manifest = json_parse(a->text, len, why, sizeof why);
    if (!a->manifest) {
        set_error("%s: not valid JSON (%s)", a->where, why);
        return -1;
    }
    const json *format = json_get(a->manifest, "format"), *version = json_get(a->manifest, "format_version");
    if (a->manifest->type != JSON_OBJECT || !format || format->type != JSON_STRING || strcmp(format->string, FORMAT)) {
        set_error("%s: not an llmc manifest (format is %s)", a->where,
                  format && format->type == JSON_STRING ? format->string : "missing");
        return -1;
    }
    if (!version || version->type != JSON_NUMBER || !version->is_int || version->integer != FORMAT_VERSION) {
        set_error("%s: format version %.*s; this runtime reads version %d (recompile with this llmc)", a->where,
                  version ? (int)version->src_len : 4, version ? version->src : "none", FORMAT_VERSION);
        return -1;
    }
    const json *recorded = field(a->manifest, "manifest_sha256", JSON_STRING, "manifest");
    if (!recorded) return -1;
    size_t n;
    char *body = json_canonical(a->manifest, "manifest_sha256", &n), hex[65];
    if (!body) { set_error("out of memory"); return -1; }
    sha256_ctx c;
    sha256_init(&c);
    sha256_update(&c, body, n);
    sha256_hex(&c, hex);
    free(body);
    if (strcmp(hex, recorded->string)) {
        set_error("%s: altered after compilation (its checksum, manifest_sha256, does not match its fields); "
                  "recompile rather than edit an artifact", a->where);
        return -1;
    }
    return check_files(a);
}

void artifact_close(artifact *a) {
    json_free(a->manifest);
    free(a->text);
    free(a->dir);
    free(a->where);
    memset(a, 0, sizeof *a);
}
