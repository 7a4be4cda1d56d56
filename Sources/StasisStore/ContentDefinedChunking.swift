/// Where content-defined chunks of CRIU's page images end, so that two checkpoints of a process whose memory
/// moved (a new mapping below the heap, pages that came or went) still share the chunks of what did not
/// change: fixed 2 MiB pieces all shift with the first page that moves, and none is found again.
///
/// CRIU's page images are whole 4 KiB pages, and whatever moves in them moves by whole pages, so the window
/// that decides a cut is one page rather than FastCDC's sliding bytes: a chunk ends after a page whose hash
/// has its low `maskBits` bits set, once the chunk holds `minimum` bytes, and always at `maximum`. The same
/// run of pages is cut the same way wherever it lies in the file (after `minimum` bytes of it). Hashing a
/// page's words is much cheaper than a rolling hash over every byte and reads each byte once.
///
/// A zero page's hash is 0, never a cut: runs of zeros are cut at `maximum`, and such chunks stay unstored
/// zero chunks as with fixed pieces. Sizes are bounded by `maximum` (at most the store's chunk size, so every
/// buffer sized for a fixed chunk holds any content-defined one).
public struct ContentDefinedChunking: Sendable, Equatable {
    public static let pageSize = 4096
    public let minimum: Int
    public let maximum: Int
    public let maskBits: Int

    /// 512 KiB to 2 MiB, one cut every 128 pages on average past the minimum: about 1 MiB a chunk. Smaller
    /// chunks share more, but each is a file in the store, and creating files is what a dump into a disk
    /// store spends most on after hashing (ext4, measured: 384 KiB chunks made a dump of 1 GiB 1.5x slower).
    public static let standard = ContentDefinedChunking(minimum: 512 << 10, maximum: ChunkFormat.chunkSize, maskBits: 7)

    public init(minimum: Int, maximum: Int, maskBits: Int) {
        precondition(minimum > 0 && minimum % Self.pageSize == 0 && maximum % Self.pageSize == 0 && minimum <= maximum)
        precondition((0...32).contains(maskBits))
        (self.minimum, self.maximum, self.maskBits) = (minimum, maximum, maskBits)
    }

    /// Scans the whole pages at the start of `pages`, which follow `chunkLength` bytes of the current chunk
    /// (a multiple of the page size). Returns how many bytes it consumed and whether the chunk ends there;
    /// without a cut, every whole page was consumed (a partial page at the end is left for the next call).
    public func scan(_ pages: UnsafeRawBufferPointer, chunkLength: Int) -> (consumed: Int, cut: Bool) {
        let mask = (UInt64(1) << UInt64(maskBits)) - 1
        var offset = 0
        var length = chunkLength
        while pages.count - offset >= Self.pageSize {
            length += Self.pageSize
            let page = UnsafeRawBufferPointer(rebasing: pages[offset..<offset + Self.pageSize])
            offset += Self.pageSize
            if length >= maximum || (length >= minimum && Self.hash(page) & mask == mask) { return (offset, true) }
        }
        return (offset, false)
    }

    /// The cuts of a whole file held in memory: each chunk's length, in order (the last one may end in a
    /// partial page). What the ingester's incremental scans of the same bytes must give.
    public func lengths(of bytes: UnsafeRawBufferPointer) -> [Int] {
        var lengths: [Int] = []
        var start = 0
        var length = 0
        while start + length < bytes.count {
            let (consumed, cut) = scan(UnsafeRawBufferPointer(rebasing: bytes[(start + length)...]), chunkLength: length)
            length += consumed
            if cut {
                lengths.append(length)
                start += length
                length = 0
            } else {
                lengths.append(bytes.count - start)
                break
            }
        }
        return lengths
    }

    /// A 64-bit hash of one page's words: four independent multiply-add lanes (so the multiplies overlap)
    /// and a final mix whose low bits depend on every lane. 0 for a page of zeros.
    public static func hash(_ page: UnsafeRawBufferPointer) -> UInt64 {
        let words = page.count / 8
        var a: UInt64 = 0, b: UInt64 = 0, c: UInt64 = 0, d: UInt64 = 0
        let k: UInt64 = 0x9E37_79B9_7F4A_7C15
        var index = 0
        while index + 4 <= words {
            a = (a &+ page.loadUnaligned(fromByteOffset: index * 8, as: UInt64.self)) &* k
            b = (b &+ page.loadUnaligned(fromByteOffset: index * 8 + 8, as: UInt64.self)) &* k
            c = (c &+ page.loadUnaligned(fromByteOffset: index * 8 + 16, as: UInt64.self)) &* k
            d = (d &+ page.loadUnaligned(fromByteOffset: index * 8 + 24, as: UInt64.self)) &* k
            index += 4
        }
        var h = a ^ (b << 17 | b >> 47) ^ (c << 31 | c >> 33) ^ (d << 47 | d >> 17)
        // MurmurHash3's finaliser: every output bit depends on every input bit.
        h ^= h >> 33
        h = h &* 0xFF51_AFD7_ED55_8CCD
        h ^= h >> 33
        h = h &* 0xC4CE_B9FE_1A85_EC53
        h ^= h >> 33
        return h
    }
}
