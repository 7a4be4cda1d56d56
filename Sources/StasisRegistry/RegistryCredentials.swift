import Foundation
import StasisCore
import StasisOS

/// A user name and password (or token) for a registry, read where the container tools keep them: the file
/// `$REGISTRY_AUTH_FILE` names, containers' auth.json (`$XDG_RUNTIME_DIR/containers/auth.json`,
/// `~/.config/containers/auth.json`), then docker's `~/.docker/config.json`; the first file with an entry for
/// the registry wins. Entries are `"auths": {"HOST[:PORT]": {"auth": base64("user:password")}}` (a
/// `https://` prefix or a `/v1/` suffix on the key is ignored, as docker writes them).
public struct RegistryCredentials: Sendable {
    public var user: String
    public var password: String
    /// The file they came from, for messages.
    public var source: String

    var basic: String { "Basic " + Data("\(user):\(password)".utf8).base64EncodedString() }

    public static func files(environment: [String: String] = ProcessInfo.processInfo.environment) -> [String] {
        let home = environment["HOME"] ?? NSHomeDirectory()
        return [environment["REGISTRY_AUTH_FILE"], environment["XDG_RUNTIME_DIR"].map { $0 + "/containers/auth.json" },
                home + "/.config/containers/auth.json", (environment["DOCKER_CONFIG"] ?? home + "/.docker") + "/config.json"].compactMap { $0 }
    }

    /// The credentials for `registry` ("host" or "host:port"), or nil when no file has them. A file that is
    /// there but cannot be read or parsed is an error naming it.
    public static func lookup(_ registry: String, files: [String] = files()) throws -> RegistryCredentials? {
        for file in files {
            guard let data = try FileSystem.readFileIfPresent(file) else { continue }
            // Not JSON: refused below, naming the file.
            guard let object = try? JSONSerialization.jsonObject(with: data) as? [String: Any] else {
                throw StasisError(.invalidArgument, "\(file) is not a JSON object of registry credentials")
            }
            let auths = object["auths"] as? [String: Any] ?? [:]
            for (key, value) in auths where normalized(key) == registry {
                guard let entry = value as? [String: Any], let encoded = entry["auth"] as? String,
                      let decoded = Data(base64Encoded: encoded).map({ String(decoding: $0, as: UTF8.self) }),
                      let colon = decoded.firstIndex(of: ":") else {
                    throw StasisError(.invalidArgument, "the entry for \(registry) in \(file) has no auth of the form base64(user:password)")
                }
                return RegistryCredentials(user: String(decoded[..<colon]), password: String(decoded[decoded.index(after: colon)...]), source: file)
            }
        }
        return nil
    }

    static func normalized(_ key: String) -> String {
        var key = Substring(key)
        for prefix in ["https://", "http://"] where key.hasPrefix(prefix) { key = key.dropFirst(prefix.count) }
        if let slash = key.firstIndex(of: "/") { key = key[..<slash] }
        return String(key)
    }
}
