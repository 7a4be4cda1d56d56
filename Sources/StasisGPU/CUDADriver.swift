import Foundation
import Glibc
import StasisCore
import StasisOS

/// The NVIDIA driver, reached through dlopen("libcuda.so.1") at run time so that stasis builds and runs
/// where there is no GPU. Only the few entry points we call are declared, with the driver API's C types
/// (CUresult = int32, CUdevice = int32, CUuuid = 16 bytes).
public final class CUDADriver: @unchecked Sendable {
    public static let libraryName = "libcuda.so.1"

    typealias CUresult = Int32
    typealias InitFn = @convention(c) (UInt32) -> CUresult
    typealias IntOutFn = @convention(c) (UnsafeMutablePointer<Int32>) -> CUresult
    typealias DeviceGetFn = @convention(c) (UnsafeMutablePointer<Int32>, Int32) -> CUresult
    typealias DeviceNameFn = @convention(c) (UnsafeMutablePointer<CChar>, Int32, Int32) -> CUresult
    typealias DeviceUUIDFn = @convention(c) (UnsafeMutablePointer<UInt8>, Int32) -> CUresult
    typealias DeviceMemFn = @convention(c) (UnsafeMutablePointer<Int>, Int32) -> CUresult
    typealias ErrorNameFn = @convention(c) (CUresult, UnsafeMutablePointer<UnsafePointer<CChar>?>) -> CUresult

    private let handle: UnsafeMutableRawPointer
    public let libraryPath: String

    /// Loads the driver library; throws a `.gpu` error saying why when it is absent.
    public init() throws {
        guard let handle = dlopen(Self.libraryName, RTLD_NOW | RTLD_LOCAL) else {
            let reason = dlerror().map { String(cString: $0) } ?? "unknown reason"
            throw StasisError(.gpu, "no GPU driver: cannot load \(Self.libraryName) (\(reason))",
                              hint: "install the NVIDIA driver (>= 570 for checkpointing) or run on a machine with a GPU")
        }
        self.handle = handle
        // The file the loader picked, from our own mappings (dladdr needs _GNU_SOURCE, which Swift's Glibc lacks).
        let maps = (try? String(contentsOfFile: "/proc/self/maps", encoding: .utf8)) ?? ""
        libraryPath = maps.split(separator: "\n").lazy.compactMap { line in
            line.split(separator: " ", omittingEmptySubsequences: true).last.map(String.init)
        }.first { $0.hasSuffix("/" + Self.libraryName) || $0.contains("/libcuda.so.") } ?? Self.libraryName
    }

    deinit { dlclose(handle) }

    func symbol<T>(_ name: String, as type: T.Type) -> T? {
        guard let pointer = dlsym(handle, name) else { return nil }
        return unsafeBitCast(pointer, to: type)
    }

    public func has(_ name: String) -> Bool { dlsym(handle, name) != nil }

    /// "CUDA_ERROR_NO_DEVICE (100)", or the bare number where the driver cannot name it.
    public func errorName(_ code: Int32) -> String {
        var name: UnsafePointer<CChar>?
        if let fn = symbol("cuGetErrorName", as: ErrorNameFn.self), fn(code, &name) == 0, let name {
            return "\(String(cString: name)) (\(code))"
        }
        return "CUresult \(code)"
    }

    func check(_ result: CUresult, _ call: String) throws {
        guard result == 0 else { throw StasisError(.gpu, "\(call) failed: \(errorName(result))") }
    }

    func required<T>(_ name: String, as type: T.Type) throws -> T {
        guard let fn = symbol(name, as: type) else {
            throw StasisError(.gpu, "\(libraryPath) lacks \(name)", hint: "the driver is too old; install driver >= 570")
        }
        return fn
    }

    public func initialize() throws { try check(try required("cuInit", as: InitFn.self)(0), "cuInit") }

    /// The driver API version as "13.0" (cuDriverGetVersion gives 1000*major + 10*minor).
    public func driverVersion() throws -> String {
        var version: Int32 = 0
        try check(try required("cuDriverGetVersion", as: IntOutFn.self)(&version), "cuDriverGetVersion")
        return "\(version / 1000).\((version % 1000) / 10)"
    }

    public struct Device: Codable, Sendable, Equatable {
        public var index: Int
        public var name: String
        public var uuid: String
        public var memoryBytes: UInt64
    }

    public func devices() throws -> [Device] {
        var count: Int32 = 0
        try check(try required("cuDeviceGetCount", as: IntOutFn.self)(&count), "cuDeviceGetCount")
        let get = try required("cuDeviceGet", as: DeviceGetFn.self)
        let getName = try required("cuDeviceGetName", as: DeviceNameFn.self)
        let getUUID = try symbol("cuDeviceGetUuid_v2", as: DeviceUUIDFn.self) ?? required("cuDeviceGetUuid", as: DeviceUUIDFn.self)
        let getMemory = try required("cuDeviceTotalMem_v2", as: DeviceMemFn.self)
        return try (0..<count).map { index in
            var device: Int32 = 0
            try check(get(&device, index), "cuDeviceGet(\(index))")
            var name = [CChar](repeating: 0, count: 256)
            try check(getName(&name, Int32(name.count), device), "cuDeviceGetName(\(index))")
            var uuid = [UInt8](repeating: 0, count: 16)
            try check(getUUID(&uuid, device), "cuDeviceGetUuid(\(index))")
            var memory = 0
            try check(getMemory(&memory, device), "cuDeviceTotalMem(\(index))")
            return Device(index: Int(index), name: String(nulTerminated: name), uuid: Self.formatUUID(uuid), memoryBytes: UInt64(memory))
        }
    }

    /// "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx", as nvidia-smi prints it.
    static func formatUUID(_ bytes: [UInt8]) -> String {
        let hex = bytes.map { String(format: "%02x", $0) }.joined()
        let parts = [0..<8, 8..<12, 12..<16, 16..<20, 20..<32].map { range in
            String(hex[hex.index(hex.startIndex, offsetBy: range.lowerBound)..<hex.index(hex.startIndex, offsetBy: range.upperBound)])
        }
        return "GPU-" + parts.joined(separator: "-")
    }

    /// The process checkpoint API entry points (driver >= 550; restore with GPU remapping needs >= 570).
    public static let checkpointSymbols = ["cuCheckpointProcessGetRestoreThreadId", "cuCheckpointProcessGetState",
                                           "cuCheckpointProcessLock", "cuCheckpointProcessCheckpoint",
                                           "cuCheckpointProcessRestore", "cuCheckpointProcessUnlock"]
}

/// What `stasis check` reports about the GPU side: "no GPU driver" is a normal answer.
public struct GPUReport: Codable, Sendable {
    public var driverLoaded: Bool
    public var library: String?
    public var driverVersion: String?
    public var checkpointAPI: Bool
    public var devices: [CUDADriver.Device]
    public var problem: String?
    public var hint: String?

    public static func probe() -> GPUReport {
        let driver: CUDADriver
        do { driver = try CUDADriver() } catch let error as StasisError {
            return GPUReport(driverLoaded: false, checkpointAPI: false, devices: [], problem: error.message, hint: error.hint)
        } catch {
            return GPUReport(driverLoaded: false, checkpointAPI: false, devices: [], problem: "\(error)")
        }
        var report = GPUReport(driverLoaded: true, library: driver.libraryPath,
                               checkpointAPI: CUDADriver.checkpointSymbols.allSatisfy(driver.has), devices: [])
        do {
            report.driverVersion = try driver.driverVersion()
            try driver.initialize()
            report.devices = try driver.devices()
        } catch let error as StasisError {
            report.problem = error.message
            report.hint = error.hint
        } catch {
            report.problem = "\(error)"
        }
        if !report.checkpointAPI, report.problem == nil {
            report.problem = "the driver has no process checkpoint API"
            report.hint = "install NVIDIA driver >= 570"
        }
        return report
    }
}
