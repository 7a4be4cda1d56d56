import CStasisCUDA
import Foundation
import StasisCore
import StasisOS

/// The driver's process checkpoint API (cuCheckpointProcess*), through CStasisCUDA. Each call names the
/// process and the step in its error, with the driver's error name.
public enum CheckpointDriver {
    public enum State: Int32, Sendable, CustomStringConvertible {
        case running = 0, locked = 1, checkpointed = 2, failed = 3
        public var description: String { ["running", "locked", "checkpointed", "failed"][Int(rawValue)] }
    }

    /// Loads the driver; a `.gpu` error says why it is not there.
    public static func load() throws {
        var buffer = [CChar](repeating: 0, count: 512)
        guard stasis_cuda_load(&buffer, buffer.count) == 0 else {
            throw StasisError(.gpu, "no GPU driver: \(String(nulTerminated: buffer))",
                              hint: "install the NVIDIA driver (>= 570 for checkpointing) or run on a machine with a GPU")
        }
        guard stasis_cuda_has_checkpoint_api() == 1 else {
            throw StasisError(.gpu, "the GPU driver (API \(versionString)) has no process checkpoint API", hint: "install NVIDIA driver >= 570")
        }
    }

    /// "13.0" from the driver API version.
    public static var versionString: String {
        let version = stasis_cuda_driver_version()
        return version < 0 ? "unknown" : "\(version / 1000).\((version % 1000) / 10)"
    }

    static func name(_ result: Int32) -> String { "\(String(cString: stasis_cuda_error_name(result))) (\(result))" }

    static func check(_ result: Int32, _ step: String, _ pid: Int32) throws {
        guard result == 0 else { throw StasisError(.gpu, "\(step) of PID \(pid) failed: \(name(result))") }
    }

    /// The process's checkpoint state, or nil for a process the driver does not know (no CUDA in it).
    public static func state(_ pid: Int32) -> State? {
        var value: Int32 = 0
        guard stasis_cuda_get_state(pid, &value) == 0 else { return nil }
        return State(rawValue: value)
    }

    public static func lock(_ pid: Int32, timeoutMilliseconds: UInt32) throws {
        try check(stasis_cuda_lock(pid, timeoutMilliseconds), "cuCheckpointProcessLock", pid)
    }

    public static func checkpoint(_ pid: Int32) throws {
        try check(stasis_cuda_checkpoint(pid), "cuCheckpointProcessCheckpoint", pid)
    }

    /// Restores device state, remapping GPUs given as (old UUID, new UUID) pairs of 16 bytes each.
    public static func restore(_ pid: Int32, remapping pairs: [(old: [UInt8], new: [UInt8])] = []) throws {
        var table = pairs.map { pair -> stasis_cuda_gpu_pair in
            var entry = stasis_cuda_gpu_pair()
            withUnsafeMutableBytes(of: &entry.old_uuid) { $0.copyBytes(from: pair.old.prefix(16)) }
            withUnsafeMutableBytes(of: &entry.new_uuid) { $0.copyBytes(from: pair.new.prefix(16)) }
            return entry
        }
        let result = table.withUnsafeMutableBufferPointer { stasis_cuda_restore(pid, $0.baseAddress, UInt32($0.count)) }
        try check(result, "cuCheckpointProcessRestore", pid)
    }

    public static func unlock(_ pid: Int32) throws {
        try check(stasis_cuda_unlock(pid), "cuCheckpointProcessUnlock", pid)
    }

    /// Puts a process back to running from whatever state the steps left it in (CStasisCUDA's resume, which
    /// the CRIU plugin uses too).
    public static func resume(_ pid: Int32) throws {
        try check(stasis_cuda_resume(pid), "putting the GPU back (restore + unlock)", pid)
    }
}
