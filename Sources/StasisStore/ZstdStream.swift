import CStasisCompress
import StasisCore

/// Decodes a zstd stream written by another program (podman compresses its checkpoint archives with zstd by
/// default) piece by piece, in bounded memory.
public final class ZstdStreamDecoder {
    private let decoder: UnsafeMutableRawPointer
    /// Whether the last piece decoded ended a frame: a stream that stops elsewhere is truncated.
    public private(set) var atFrameEnd = true

    public init() throws {
        guard let decoder = stasis_zstd_decoder_new() else { throw StasisError(.io, "cannot make a zstd decoder") }
        self.decoder = decoder
    }

    deinit { stasis_zstd_decoder_free(decoder) }

    /// Decodes all of `input`, handing each decoded piece (in `scratch`) to `deliver`.
    public func decode(_ input: UnsafeRawBufferPointer, scratch: UnsafeMutableRawBufferPointer,
                       _ deliver: (UnsafeRawBufferPointer) throws -> Void) throws {
        var offset = 0
        repeat {
            var consumed = 0, produced = 0
            let status = stasis_zstd_decode(decoder, input.baseAddress.map { $0 + offset }, input.count - offset, &consumed,
                                            scratch.baseAddress, scratch.count, &produced)
            guard status >= 0 else { throw StasisError(.integrity, "the zstd stream is corrupt") }
            offset += consumed
            atFrameEnd = status == 1
            if produced > 0 { try deliver(UnsafeRawBufferPointer(rebasing: scratch[0..<produced])) }
            // Input all taken and the output not full: the decoder holds nothing more for now.
            if offset == input.count && produced < scratch.count { return }
            // Neither read nor wrote: it wants input that is not there (never loop on a crafted stream).
            if consumed == 0 && produced == 0 { throw StasisError(.integrity, "the zstd stream does not advance") }
        } while true
    }
}
