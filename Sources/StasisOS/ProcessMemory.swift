import CStasisLinux
import Glibc
import StasisCore

/// Another process's memory, copied in one step by the kernel (process_vm_readv/writev): how stasis takes
/// device data out of a GPU process's pinned staging ring and puts it back.
public enum ProcessMemory {
    public static func read(pid: Int32, address: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws {
        try transfer(pid: pid, address: address, count: buffer.count, what: "read") { done in
            stasis_process_read(pid, buffer.baseAddress! + done, address + UInt64(done), UInt(buffer.count - done))
        }
    }

    public static func write(pid: Int32, address: UInt64, from buffer: UnsafeRawBufferPointer) throws {
        try transfer(pid: pid, address: address, count: buffer.count, what: "write") { done in
            stasis_process_write(pid, buffer.baseAddress! + done, address + UInt64(done), UInt(buffer.count - done))
        }
    }

    /// Calls `step(bytesDone)` until `count` bytes are moved; the kernel may move fewer than asked at once.
    private static func transfer(pid: Int32, address: UInt64, count: Int, what: String, _ step: (Int) -> Int) throws {
        var done = 0
        while done < count {
            let moved = step(done)
            if moved < 0 && errno == EINTR { continue }
            guard moved > 0 else {
                throw StasisError(.io, "cannot \(what) \(count) bytes at \(String(address, radix: 16)) of PID \(pid): \(String(cString: strerror(errno)))")
            }
            done += moved
        }
    }
}

/// A shared mapping of another process's (a memfd it mapped MAP_SHARED), mapped here too through
/// /proc/PID/map_files: the same pages, read and written in place, with no copy between the processes. How
/// stasis reaches a GPU process's staging ring where the agent made it shareable; opening map_files needs
/// CAP_SYS_ADMIN, as CRIU does.
// @unchecked Sendable: the address is set once; which bytes are touched when is the callers' to divide.
public final class ForeignMapping: @unchecked Sendable {
    public let base: UnsafeMutableRawPointer
    public let length: Int

    /// Maps the `length` bytes at `address` of `pid` when a shared mapping of the start of a memfd named
    /// `memfd`, at least that long, starts there; nil when none does or it cannot be mapped (the caller copies
    /// with process_vm_readv/writev). The process must not shrink the file while it is mapped here (stasis
    /// would fault on the pages it lost).
    public init?(pid: Int32, address: UInt64, length: Int, memfd: String) {
        guard length > 0, let mapping = ProcFS.mappings(pid).first(where: { $0.start == address }), mapping.shared,
              mapping.fileOffset == 0, mapping.path.hasPrefix("/memfd:\(memfd)"), mapping.bytes >= UInt64(length) else { return nil }
        let name = "/proc/\(pid)/map_files/\(String(mapping.start, radix: 16))-\(String(mapping.end, radix: 16))"
        let fd = open(name, O_RDWR | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var info = stat()
        guard fstat(fd, &info) == 0, (info.st_mode & S_IFMT) == S_IFREG, info.st_size >= length else { return nil }
        guard let address = mmap(nil, length, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0), address != MAP_FAILED else { return nil }
        (base, self.length) = (address, length)
    }

    deinit { munmap(base, length) }
}
