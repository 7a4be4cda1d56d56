import Foundation
import StasisCore
import StasisOS

/// The criu executable this stasis drives, and its version.
public struct CRIUBinary: Sendable {
    public static let minimumMajor = 4
    public static let installHint = "install CRIU >= 4.0: run scripts/install-criu.sh from the stasis source tree as root " +
        "(it uses the distribution's package when new enough, else builds Debian's source package), or set STASIS_CRIU to its path"

    public var path: String
    public var version: String

    /// Finds criu: $STASIS_CRIU when set, else the first criu on PATH (as runc and podman look for it).
    public static func locate(environment: [String: String] = ProcessInfo.processInfo.environment) throws -> CRIUBinary {
        let path: String
        if let explicit = environment["STASIS_CRIU"], !explicit.isEmpty {
            guard FileSystem.isExecutable(explicit) else {
                throw StasisError(.criuMissing, "STASIS_CRIU=\(explicit) is not an executable file", hint: installHint)
            }
            path = explicit
        } else if let found = Spawn.which("criu", path: environment["PATH"]) {
            path = found
        } else {
            throw StasisError(.criuMissing, "CRIU was not found on PATH (\(environment["PATH"] ?? ""))",
                              hint: installHint + "; scripts/install-criu.sh puts it in /usr/local/sbin, which must be on PATH")
        }
        let version = try Self.version(of: path)
        guard let major = Int(version.split(separator: ".").first ?? ""), major >= minimumMajor else {
            throw StasisError(.criuTooOld, "CRIU at \(path) is version \(version); stasis needs 4.0 or newer", hint: installHint)
        }
        return CRIUBinary(path: path, version: version)
    }

    /// The CRIU version a dump log names ("(00.000034) Version: 4.2.1 (gitid 0)" gives "4.2.1"): how an
    /// engine's archive tells which CRIU wrote its images.
    public static func version(inLog text: String) -> String? {
        for line in text.split(separator: "\n").prefix(20) {
            guard let range = line.range(of: "Version: ") else { continue }
            let version = line[range.upperBound...].prefix { $0.isNumber || $0 == "." }
            if !version.isEmpty { return String(version) }
        }
        return nil
    }

    /// Refuses images written by a newer CRIU than this one: CRIU reads the images of its earlier versions,
    /// not those of later ones (which may hold what it does not know). A version that is not numbers
    /// ("unknown") is not judged.
    public func checkRestores(imagesOf writer: String) throws {
        func numbers(_ text: String) -> [Int]? {
            let parts = text.split(separator: ".").map { Int($0) }
            return parts.isEmpty || parts.contains(nil) ? nil : parts.map { $0! }
        }
        guard let theirs = numbers(writer), let ours = numbers(version) else { return }
        let width = max(theirs.count, ours.count)
        let padded = { (list: [Int]) in list + Array(repeating: 0, count: width - list.count) }
        if padded(theirs).lexicographicallyPrecedes(padded(ours)) || padded(theirs) == padded(ours) { return }
        throw StasisError(.criuTooOld, "the checkpoint's images were written by CRIU \(writer), newer than this host's CRIU \(version) at \(path)",
                          hint: "install CRIU \(writer) or newer here (scripts/install-criu.sh), or checkpoint with the CRIU this host has")
    }

    /// Runs `criu --version` and returns "4.1.1" from "Version: 4.1.1".
    static func version(of path: String) throws -> String {
        let output: Data
        do {
            output = try Spawn.output(path, ["--version"]).stdout
        } catch {
            throw StasisError(.criuMissing, "cannot run \(path): \(error)", hint: installHint)
        }
        let text = String(decoding: output, as: UTF8.self)
        for line in text.split(separator: "\n") where line.hasPrefix("Version:") {
            return line.dropFirst("Version:".count).trimmingCharacters(in: .whitespaces)
        }
        throw StasisError(.criuMissing, "\(path) --version printed no version (got: \(text.prefix(200)))", hint: installHint)
    }
}
