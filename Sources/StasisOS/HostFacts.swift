import Foundation
import Glibc
import StasisCore

/// Facts about this machine that decide whether a checkpoint can run here.
public enum HostFacts {
    /// Instruction-set extensions user code may have been compiled or JIT'd for. A restored process that
    /// meets a CPU without one of these dies later with SIGILL, so restore compares exactly this set. Flags that
    /// describe the platform rather than the instruction set (hypervisor, constant_tsc, ...) vary between
    /// identical machines and are left out on purpose.
    public static let instructionSetFlags: Set<String> = [
        "sse", "sse2", "pni", "ssse3", "sse4_1", "sse4_2", "popcnt", "aes", "pclmulqdq", "avx", "avx2", "fma",
        "f16c", "bmi1", "bmi2", "abm", "adx", "movbe", "sha_ni", "rdrand", "rdseed", "xsave", "xsaveopt",
        "xsavec", "avx512f", "avx512dq", "avx512cd", "avx512bw", "avx512vl", "avx512ifma", "avx512vbmi",
        "avx512_vbmi2", "avx512_vnni", "avx512_bitalg", "avx512_vpopcntdq", "avx512_bf16", "avx512_fp16",
        "avx_vnni", "vaes", "vpclmulqdq", "gfni", "amx_tile", "amx_int8", "amx_bf16", "clflushopt", "clwb",
        "fsrm", "erms", "lzcnt",
        // arm64 (Features line)
        "asimd", "sve", "sve2", "atomics", "crc32", "sha2", "sha3", "sha512", "fphp", "asimdhp", "dotprod", "i8mm", "bf16",
    ]

    public static func current() -> Manifest.Host {
        var names = utsname()
        uname(&names)
        func field<T>(_ value: inout T) -> String {
            withUnsafePointer(to: &value) { $0.withMemoryRebound(to: CChar.self, capacity: MemoryLayout<T>.size) { String(cString: $0) } }
        }
        let (model, flags) = cpuInfo()
        return Manifest.Host(hostname: field(&names.nodename), kernel: field(&names.release), machine: field(&names.machine),
                             cpuModel: model, cpuFlags: flags.filter(instructionSetFlags.contains).sorted(),
                             pageSize: Int(sysconf(Int32(_SC_PAGESIZE))))
    }

    /// MemAvailable of /proc/meminfo: what can be taken without swapping (page cache that can go included).
    public static func availableMemoryBytes() -> UInt64? {
        // nil is "not known", which callers allow for; /proc is there wherever CRIU runs.
        guard let text = try? String(contentsOfFile: "/proc/meminfo", encoding: .utf8),
              let line = text.split(separator: "\n").first(where: { $0.hasPrefix("MemAvailable:") }),
              let kilobytes = UInt64(line.split(separator: " ", omittingEmptySubsequences: true).dropFirst().first ?? "") else { return nil }
        return kilobytes * 1024
    }

    /// The CPU model name and the flags of the first processor in /proc/cpuinfo.
    static func cpuInfo() -> (String, Set<String>) {
        // Without /proc (never where CRIU runs) the host is described as unknown, as one that lists no model is.
        guard let text = try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8) else { return ("unknown", []) }
        var model = "unknown"
        var flags: Set<String> = []
        for line in text.split(separator: "\n") {
            let parts = line.split(separator: ":", maxSplits: 1).map { $0.trimmingCharacters(in: .whitespaces) }
            guard parts.count == 2 else { continue }
            switch parts[0] {
            case "model name" where model == "unknown": model = parts[1]
            case "flags" where flags.isEmpty, "Features" where flags.isEmpty: flags = Set(parts[1].split(separator: " ").map(String.init))
            default: break
            }
        }
        return (model, flags)
    }
}
