import CStasisCUDA
import Foundation
import StasisCore
import StasisOS

/// What `stasis check` reports about the GPU side, through the same driver loader as the checkpoint steps.
/// "no GPU driver" is a normal answer.
public struct GPUReport: Codable, Sendable {
    public struct Device: Codable, Sendable, Equatable {
        public var index: Int
        public var name: String
        public var uuid: String
        public var memoryBytes: UInt64
    }

    public var driverLoaded: Bool
    public var library: String?
    public var driverVersion: String?
    public var checkpointAPI: Bool
    public var devices: [Device]
    public var problem: String?
    public var hint: String?

    public static func probe() -> GPUReport {
        var report = GPUReport(driverLoaded: stasis_cuda_library_loaded() == 1, checkpointAPI: false, devices: [])
        do {
            try CheckpointDriver.load()
        } catch let error as StasisError {
            report.problem = error.message
            report.hint = error.hint
            return report
        } catch {
            report.problem = "\(error)"
            return report
        }
        report.library = loadedLibraryPath()
        report.driverVersion = CheckpointDriver.versionString
        report.checkpointAPI = true
        var count: Int32 = 0
        let result = stasis_cuda_device_count(&count)
        guard result == 0 else {
            report.problem = "cuDeviceGetCount failed: \(CheckpointDriver.name(result))"
            return report
        }
        for index in 0..<count {
            var name = [CChar](repeating: 0, count: 256)
            var uuid = [UInt8](repeating: 0, count: 16)
            var memory = 0
            let result = stasis_cuda_device_info(index, &name, name.count, &uuid, &memory)
            guard result == 0 else {
                report.problem = "GPU \(index): \(CheckpointDriver.name(result))"
                continue
            }
            report.devices.append(Device(index: Int(index), name: String(nulTerminated: name), uuid: formatUUID(uuid), memoryBytes: UInt64(memory)))
        }
        return report
    }

    /// The libcuda file the loader picked, from our own mappings.
    static func loadedLibraryPath() -> String? {
        ProcFS.mappings(ThisProcess.pid).first { $0.path.contains("/libcuda.so") }?.path
    }

    /// "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx", as nvidia-smi prints it.
    static func formatUUID(_ bytes: [UInt8]) -> String {
        let hex = SegmentedDigest.hex(bytes)
        let parts = [0..<8, 8..<12, 12..<16, 16..<20, 20..<32].map { range in
            String(hex[hex.index(hex.startIndex, offsetBy: range.lowerBound)..<hex.index(hex.startIndex, offsetBy: range.upperBound)])
        }
        return "GPU-" + parts.joined(separator: "-")
    }
}
