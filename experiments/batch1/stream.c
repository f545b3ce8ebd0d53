/* Read-bandwidth roofline for a batch-1 decode step: T threads stream one buffer of B bytes
 * (the model's weight bytes) as dot products with a small vector, like a matrix-vector product
 * with ideal scheduling: each thread one contiguous half, threads created once per pass.
 *
 *   stream BYTES THREADS HUGE REPEATS  ->  prints "best_seconds"
 * HUGE=1 asks for transparent huge pages on the buffer (madvise), as a file mmap may get them. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>

static float *buffer;
static float vec[1024] __attribute__((aligned(64)));

typedef struct { long lo, hi; float sum; } span_t;

typedef float v16 __attribute__((vector_size(64)));  /* 16 floats; the compiler picks the ISA */

static void *stream(void *arg) {
  span_t *s = arg;
  v16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
  const v16 *x = (const v16 *)vec;
  for (long i = s->lo; i < s->hi; i += 64) {
    const v16 *w = (const v16 *)(buffer + i);
    const long j = (i & 1023) / 16;
    a0 += w[0] * x[j]; a1 += w[1] * x[j + 1]; a2 += w[2] * x[j + 2]; a3 += w[3] * x[j + 3];
  }
  v16 a = a0 + a1 + a2 + a3;
  float sum = 0;
  for (int k = 0; k < 16; ++k) sum += a[k];
  s->sum = sum;
  return NULL;
}

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

int main(int argc, char **argv) {
  if (argc != 5) { fprintf(stderr, "usage: stream BYTES THREADS HUGE REPEATS\n"); return 2; }
  long n = atol(argv[1]) / 4 / 1024 * 1024;
  int threads = atoi(argv[2]), huge = atoi(argv[3]), repeats = atoi(argv[4]);
  if (threads < 1 || threads > 64) { fprintf(stderr, "threads: 1..64\n"); return 2; }
  size_t bytes = ((size_t)n * 4 + (1u << 21)) & ~(size_t)((1u << 21) - 1);
  buffer = aligned_alloc(1u << 21, bytes);
  if (!buffer) { fprintf(stderr, "out of memory\n"); return 1; }
  if (huge) madvise(buffer, bytes, MADV_HUGEPAGE);
  for (long i = 0; i < n; ++i) buffer[i] = (float)(i % 7) * 1e-3f;
  for (int i = 0; i < 1024; ++i) vec[i] = 1.0f;
  double best = 1e30;
  float total = 0;
  for (int r = 0; r < repeats; ++r) {
    pthread_t th[64];
    span_t spans[64];
    double t0 = now();
    for (int k = 0; k < threads; ++k) {
      spans[k].lo = n / 1024 * k / threads * 1024;
      spans[k].hi = n / 1024 * (k + 1) / threads * 1024;
      pthread_create(&th[k], NULL, stream, &spans[k]);
    }
    for (int k = 0; k < threads; ++k) { pthread_join(th[k], NULL); total += spans[k].sum; }
    double t = now() - t0;
    if (t < best) best = t;
  }
  printf("%.9f %g\n", best, total);
  return 0;
}
