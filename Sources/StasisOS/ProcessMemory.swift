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
