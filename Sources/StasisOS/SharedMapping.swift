import Glibc

/// A file mapped read-write and shared, written through the mapping: the bytes land in the file (page cache)
/// without a write(2) each. Ranges are populated (MADV_POPULATE_WRITE, Linux 5.14) before they are written,
/// so that a full filesystem is an error there, never a SIGBUS later.
// @unchecked Sendable: the address and length are set once; what is written where is the callers' to divide.
public final class SharedMapping: @unchecked Sendable {
    public let base: UnsafeMutableRawPointer
    public let length: Int
    private static let populateWrite: Int32 = 23  // MADV_POPULATE_WRITE

    /// Maps the first `length` bytes of `fd`; nil when the file cannot be mapped or this kernel cannot
    /// populate (one probe tells), so that the caller writes the file another way.
    public init?(_ fd: FileDescriptor, length: Int) {
        guard length > 0, let address = mmap(nil, length, PROT_READ | PROT_WRITE, MAP_SHARED, fd.rawValue, 0),
              address != MAP_FAILED else { return nil }
        guard madvise(address, min(length, 4096), Self.populateWrite) == 0 || errno != EINVAL else {
            munmap(address, length)
            return nil
        }
        (base, self.length) = (address, length)
    }

    /// Allocates the file's blocks behind [offset, offset + count) (`offset` page-aligned). EFAULT, ENOMEM
    /// or ENOSPC: the filesystem has no room for them.
    public func populate(offset: Int, count: Int) throws(Errno) {
        guard madvise(base + offset, count, Self.populateWrite) == 0 else { throw Errno(rawValue: errno) }
    }

    /// Unmaps it; the mapping must not be used afterwards.
    public func unmap() { munmap(base, length) }
}
