#!/usr/bin/env bash
# Peak f32 multiply-add rate of this CPU, for MFU on `DEVICE=cpu` runs of
# bench/train_gpu.sh (PEAK_TFLOPS): one process per core, each running 12
# independent chains of fused multiply-adds on the widest vectors the CPU has
# (AVX-512, else AVX2 + FMA), all at once; the rates are summed.
#
#   bench/cpu_peak.sh            # prints per-process GFLOP/s and peak_tflops=...
#
# Env: CORES (nproc), SECONDS_EACH (about 3). Needs a C compiler (cc).
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh

CORES="${CORES:-$(nproc)}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cat >"$tmp/fma.c" <<'C'
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

#define CHAINS 12
#define BODY(VEC, SET1, FMA, STORE, LANES)                                   \
    VEC a[CHAINS], m = SET1(0.9999f), c = SET1(1e-4f);                       \
    for (int j = 0; j < CHAINS; j++) a[j] = SET1((float)j);                  \
    double t = now();                                                        \
    for (long i = 0; i < n; i++)                                             \
        for (int j = 0; j < CHAINS; j++) a[j] = FMA(a[j], m, c);             \
    t = now() - t;                                                           \
    float out[LANES], s = 0;                                                 \
    for (int j = 0; j < CHAINS; j++) { STORE(out, a[j]); s += out[0]; }      \
    if (s == 1234.5f) puts("");                                              \
    return n * (double)CHAINS * LANES * 2 / t;

__attribute__((target("avx512f"))) static double zmm(long n) {
    BODY(__m512, _mm512_set1_ps, _mm512_fmadd_ps, _mm512_storeu_ps, 16)
}
__attribute__((target("avx2,fma"))) static double ymm(long n) {
    BODY(__m256, _mm256_set1_ps, _mm256_fmadd_ps, _mm256_storeu_ps, 8)
}

int main(int argc, char **argv) {
    double seconds = argc > 1 ? atof(argv[1]) : 3.0;
    __builtin_cpu_init();
    int wide = __builtin_cpu_supports("avx512f");
    double (*run)(long) = wide ? zmm : ymm;
    double rate = run(10000000); /* warm up, then size the run */
    long n = (long)(seconds * rate / (CHAINS * (wide ? 16 : 8) * 2));
    printf("%s %.1f\n", wide ? "avx512" : "avx2", run(n) / 1e9);
    return 0;
}
C
cc -O3 -funroll-all-loops -o "$tmp/fma" "$tmp/fma.c" || die "cannot compile $tmp/fma.c (needs cc)"
for i in $(seq "$CORES"); do "$tmp/fma" "${SECONDS_EACH:-3}" >"$tmp/out.$i" & done
wait
cat "$tmp"/out.*
awk '{ s += $2 } END { printf "cores=%d peak_gflops=%.1f peak_tflops=%.4f\n", NR, s, s / 1000 }' "$tmp"/out.*
