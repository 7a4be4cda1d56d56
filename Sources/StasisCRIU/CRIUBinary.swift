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
