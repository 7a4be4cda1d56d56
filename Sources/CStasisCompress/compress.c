#include "CStasisCompress.h"

#include <limits.h>
#include <lz4.h>
#include <zstd.h>

enum { CODEC_LZ4 = 1, CODEC_ZSTD = 2 };

size_t stasis_compress_bound(int codec, size_t size) {
    switch (codec) {
    case CODEC_LZ4: return size > (size_t)LZ4_MAX_INPUT_SIZE ? 0 : (size_t)LZ4_compressBound((int)size);
    case CODEC_ZSTD: return ZSTD_compressBound(size);
    default: return 0;
    }
}

size_t stasis_compress(int codec, int level, const void *src, size_t size, void *dst, size_t capacity) {
    switch (codec) {
    case CODEC_LZ4: {
        if (size > (size_t)LZ4_MAX_INPUT_SIZE || capacity > INT_MAX) return 0;
        // The level does not apply: plain lz4 at its default acceleration (lz4 HC is too slow to ingest).
        int written = LZ4_compress_default(src, dst, (int)size, (int)capacity);
        return written > 0 ? (size_t)written : 0;
    }
    case CODEC_ZSTD: {
        // One context per thread: ZSTD_compress would allocate one on every call.
        static _Thread_local ZSTD_CCtx *context;
        if (!context && !(context = ZSTD_createCCtx())) return 0;
        size_t written = ZSTD_compressCCtx(context, dst, capacity, src, size, level);
        return ZSTD_isError(written) ? 0 : written;
    }
    default: return 0;
    }
}

int stasis_decompress(int codec, const void *src, size_t size, void *dst, size_t expected) {
    switch (codec) {
    case CODEC_LZ4: {
        if (size > INT_MAX || expected > INT_MAX) return -1;
        int got = LZ4_decompress_safe(src, dst, (int)size, (int)expected);
        return got >= 0 && (size_t)got == expected ? 0 : -1;
    }
    case CODEC_ZSTD: {
        static _Thread_local ZSTD_DCtx *context;
        if (!context && !(context = ZSTD_createDCtx())) return -1;
        size_t got = ZSTD_decompressDCtx(context, dst, expected, src, size);
        return !ZSTD_isError(got) && got == expected ? 0 : -1;
    }
    default: return -1;
    }
}

void *stasis_zstd_decoder_new(void) { return ZSTD_createDStream(); }

void stasis_zstd_decoder_free(void *decoder) { ZSTD_freeDStream((ZSTD_DStream *)decoder); }

int stasis_zstd_decode(void *decoder, const void *input, size_t input_size, size_t *consumed, void *output, size_t output_size,
                       size_t *produced) {
    ZSTD_inBuffer in = {input, input_size, 0};
    ZSTD_outBuffer out = {output, output_size, 0};
    size_t left = ZSTD_decompressStream((ZSTD_DStream *)decoder, &out, &in);
    *consumed = in.pos;
    *produced = out.pos;
    if (ZSTD_isError(left)) return -1;
    return left == 0 ? 1 : 0;
}
