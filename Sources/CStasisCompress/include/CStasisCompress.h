// Thin shim over the system's libzstd and liblz4: the only calls stasis makes, with plain C types.
#ifndef C_STASIS_COMPRESS_H
#define C_STASIS_COMPRESS_H
#include <stddef.h>

/// The most bytes compressing `size` bytes can produce with the codec (1 = lz4, 2 = zstd).
size_t stasis_compress_bound(int codec, size_t size);

/// Compresses src into dst; returns the compressed size, or 0 on failure (dst too small, bad level).
size_t stasis_compress(int codec, int level, const void *src, size_t size, void *dst, size_t capacity);

/// Decompresses src into dst, which must receive exactly `expected` bytes; returns 0 on success, -1 on any
/// error (corrupt input, or a size other than `expected`).
int stasis_decompress(int codec, const void *src, size_t size, void *dst, size_t expected);

/// A streaming zstd decoder, for data compressed by others (podman's checkpoint archives): NULL when it
/// cannot be made.
void *stasis_zstd_decoder_new(void);
void stasis_zstd_decoder_free(void *decoder);

/// Decodes from `input` into `output`: how much of each was used and made go to *consumed and *produced.
/// Returns 0 while the stream goes on, 1 when a frame ended exactly at the end of what was consumed, -1 on
/// corrupt input.
int stasis_zstd_decode(void *decoder, const void *input, size_t input_size, size_t *consumed, void *output, size_t output_size,
                       size_t *produced);

#endif
