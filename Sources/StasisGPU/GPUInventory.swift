import Foundation
import StasisCore
import StasisOS

/// The machine's GPUs and which processes use them, from NVML through `nvidia-smi` (which every driver
/// install ships): UUID, name, total and free memory per GPU, and device memory per process.
public struct GPUInventory: Sendable {
    public struct GPU: Codable, Sendable, Equatable {
        public var index: Int
        public var uuid: String
        public var name: String
        public var memoryTotalBytes: UInt64
        public var memoryFreeBytes: UInt64
    }

    public struct ProcessUse: Sendable {
        public var pid: Int32
        public var gpuUUID: String
        public var memoryBytes: UInt64
    }

    public var gpus: [GPU]
    public var processes: [ProcessUse]

    /// Reads the inventory; empty when nvidia-smi is absent (the driver API still works without it).
    public static func read() -> GPUInventory {
        guard let smi = Spawn.which("nvidia-smi") ?? ["/usr/local/nvidia/bin/nvidia-smi", "/usr/bin/nvidia-smi"].first(where: { access($0, X_OK) == 0 }) else {
            return GPUInventory(gpus: [], processes: [])
        }
        let gpus = query(smi, ["--query-gpu=index,uuid,name,memory.total,memory.free", "--format=csv,noheader,nounits"]).compactMap { fields -> GPU? in
            guard fields.count == 5, let index = Int(fields[0]), let total = UInt64(fields[3]), let free = UInt64(fields[4]) else { return nil }
            return GPU(index: index, uuid: fields[1], name: fields[2], memoryTotalBytes: total << 20, memoryFreeBytes: free << 20)
        }
        let processes = query(smi, ["--query-compute-apps=pid,gpu_uuid,used_memory", "--format=csv,noheader,nounits"]).compactMap { fields -> ProcessUse? in
            guard fields.count == 3, let pid = Int32(fields[0]) else { return nil }
            return ProcessUse(pid: pid, gpuUUID: fields[1], memoryBytes: (UInt64(fields[2]) ?? 0) << 20)
        }
        return GPUInventory(gpus: gpus, processes: processes)
    }

    static func query(_ smi: String, _ arguments: [String]) -> [[String]] {
        // nvidia-smi that cannot be run or fails lists no GPU: the machine is then one without (as without it).
        guard let (status, data) = try? Spawn.output(smi, arguments), status == 0 else { return [] }
        return String(decoding: data, as: UTF8.self).split(separator: "\n").map {
            $0.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }
        }
    }

    /// "GPU-xxxxxxxx-..." as 16 bytes.
    public static func uuidBytes(_ uuid: String) -> [UInt8]? {
        let hex = uuid.replacingOccurrences(of: "GPU-", with: "").replacingOccurrences(of: "-", with: "")
        guard hex.count == 32 else { return nil }
        var bytes: [UInt8] = []
        var index = hex.startIndex
        while index < hex.endIndex {
            let next = hex.index(index, offsetBy: 2)
            guard let byte = UInt8(hex[index..<next], radix: 16) else { return nil }
            bytes.append(byte)
            index = next
        }
        return bytes
    }
}
