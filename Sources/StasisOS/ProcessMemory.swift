import CStasisLinux
import Glibc
import StasisCore

/// Another process's memory, copied in one step by the kernel (process_vm_readv/writev): how stasis takes
/// device data out of a GPU process's pinned staging ring and puts it back.
public enum ProcessMemory {
    public static func read(pid: Int32, address: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws {
        var done = 0
        while done < buffer.count {
            let got = stasis_process_read(pid, buffer.baseAddress! + done, address + UInt64(done), UInt(buffer.count - done))
            if got < 0 && errno == EINTR { continue }
            guard got > 0 else { throw StasisError(.io, "cannot read \(buffer.count) bytes at \(String(address, radix: 16)) of PID \(pid): \(String(cString: strerror(errno)))") }
            done += got
        }
    }

    public static func write(pid: Int32, address: UInt64, from buffer: UnsafeRawBufferPointer) throws {
        var done = 0
        while done < buffer.count {
            let put = stasis_process_write(pid, buffer.baseAddress! + done, address + UInt64(done), UInt(buffer.count - done))
            if put < 0 && errno == EINTR { continue }
            guard put > 0 else { throw StasisError(.io, "cannot write \(buffer.count) bytes at \(String(address, radix: 16)) of PID \(pid): \(String(cString: strerror(errno)))") }
            done += put
        }
    }
}

/// Unix-socket facts the kernel vouches for.
public enum SocketPeer {
    /// The PID of the process at the other end of `fd`, nil when the kernel cannot say.
    public static func pid(_ fd: Int32) -> Int32? {
        let pid = stasis_socket_peer_pid(fd)
        return pid > 0 ? pid : nil
    }
}
