/* llama_logits: next-token logits, tokenization and decode timing of a GGUF model through
 * llama.cpp's C API (libllama), for tools/bench_gguf_roundtrip.py. Built by that script:
 *   cc -O2 tools/llama_logits.c -I LLAMA/include -I LLAMA/ggml/include -L BUILD/bin -lllama
 * Usage:
 *   llama_logits MODEL THREADS logits   IDS_TXT OUT_BIN   one prompt per line (token ids);
 *                                                        writes the last position's float32
 *                                                        logits [n_vocab] per prompt
 *   llama_logits MODEL THREADS tokenize HEX_TXT OUT_TXT  one hex-encoded UTF-8 text per line;
 *                                                        writes its token ids (no specials added)
 *   llama_logits MODEL THREADS decode   IDS_TXT N        greedy-decodes N tokens after each
 *                                                        prompt; prints "decode TOKENS SECONDS" */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "llama.h"

static int read_ids(char *line, llama_token *ids, int max) {
    int n = 0;
    for (char *t = strtok(line, " \n"); t && n < max; t = strtok(NULL, " \n")) ids[n++] = atoi(t);
    return n;
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    if (argc != 6) { fprintf(stderr, "usage: see the header of llama_logits.c\n"); return 2; }
    const char *mode = argv[3];
    int threads = atoi(argv[2]);
    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    struct llama_model *model = llama_model_load_from_file(argv[1], mp);
    if (!model) { fprintf(stderr, "cannot load %s\n", argv[1]); return 1; }
    const struct llama_vocab *vocab = llama_model_get_vocab(model);
    int n_vocab = llama_vocab_n_tokens(vocab);
    FILE *in = fopen(argv[4], "r");
    if (!in) { perror(argv[4]); return 1; }
    static char line[1 << 20];
    static llama_token ids[8192];
    if (strcmp(mode, "tokenize") == 0) {
        FILE *out = fopen(argv[5], "w");
        static char text[1 << 19];
        while (fgets(line, sizeof line, in)) {
            size_t len = strcspn(line, "\n") / 2;
            for (size_t i = 0; i < len; i++) { unsigned v; sscanf(line + 2 * i, "%2x", &v); text[i] = (char) v; }
            int n = llama_tokenize(vocab, text, (int32_t) len, ids, 8192, false, false);
            for (int i = 0; i < n; i++) fprintf(out, i ? " %d" : "%d", ids[i]);
            fprintf(out, "\n");
        }
        fclose(out);
        return 0;
    }
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 2048; cp.n_batch = 2048; cp.n_ubatch = 512;
    cp.n_threads = threads; cp.n_threads_batch = threads;
    struct llama_context *ctx = llama_init_from_model(model, cp);
    if (!ctx) { fprintf(stderr, "cannot create a context\n"); return 1; }
    FILE *out = strcmp(mode, "logits") == 0 ? fopen(argv[5], "wb") : NULL;
    int steps = strcmp(mode, "decode") == 0 ? atoi(argv[5]) : 0;
    double seconds = 0; long tokens = 0;
    while (fgets(line, sizeof line, in)) {
        int n = read_ids(line, ids, 8192);
        if (n == 0) continue;
        llama_memory_clear(llama_get_memory(ctx), true);
        if (llama_decode(ctx, llama_batch_get_one(ids, n))) { fprintf(stderr, "decode failed\n"); return 1; }
        float *logits = llama_get_logits_ith(ctx, -1);
        if (out) { fwrite(logits, sizeof(float), n_vocab, out); continue; }
        double t0 = now();
        for (int s = 0; s < steps; s++) {
            llama_token best = 0;
            for (int v = 1; v < n_vocab; v++) if (logits[v] > logits[best]) best = v;
            if (llama_decode(ctx, llama_batch_get_one(&best, 1))) { fprintf(stderr, "decode failed\n"); return 1; }
            logits = llama_get_logits_ith(ctx, -1);
        }
        seconds += now() - t0; tokens += steps;
    }
    if (out) fclose(out);
    if (steps) printf("decode %ld %.6f\n", tokens, seconds);
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
