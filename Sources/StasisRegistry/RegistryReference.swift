import Foundation
import StasisCore
import StasisOS

/// A checkpoint's name in a registry: `host[:port]/repository[:tag][@sha256:DIGEST]`, as container tools
/// write image references. The host is required (there is no default registry to fall back on): a first
/// part with a dot or a colon, or "localhost".
public struct RegistryReference: Sendable, Equatable, CustomStringConvertible {
    public var host: String
    public var port: UInt16?
    public var repository: String
    public var tag: String?
    public var digest: String?

    /// What the manifest is fetched by: the digest when given, else the tag ("latest" when neither).
    public var reference: String { digest ?? tag ?? "latest" }
    /// "host:port" as the registry's address and as credential files key it.
    public var registry: String { port.map { "\(host):\($0)" } ?? host }
    public var description: String { "\(registry)/\(repository)" + (tag.map { ":\($0)" } ?? "") + (digest.map { "@\($0)" } ?? "") }

    /// Whether `text` is meant as a registry reference rather than a directory: it names a registry host
    /// first and is not a path that exists.
    public static func looksLikeReference(_ text: String) -> Bool {
        guard !text.hasPrefix("/"), !text.hasPrefix("."), let slash = text.firstIndex(of: "/") else { return false }
        let first = text[..<slash]
        return (first.contains(".") || first.contains(":") || first == "localhost") && !FileSystem.exists(text)
    }

    public init(parsing text: String) throws {
        func refuse(_ why: String) -> StasisError {
            StasisError(.invalidArgument, "\(Format.printable(text)) is not a registry reference: \(why)",
                        hint: "write it as HOST[:PORT]/REPOSITORY[:TAG][@sha256:DIGEST], for example registry.example.com:5000/jobs/bert:step-1000")
        }
        var rest = Substring(text)
        if let at = rest.firstIndex(of: "@") {
            let digest = String(rest[rest.index(after: at)...])
            guard BlobDigest.isValid(digest) else {
                throw refuse("the digest must be sha256: and 64 lowercase hex digits")
            }
            self.digest = digest
            rest = rest[..<at]
        }
        guard let slash = rest.firstIndex(of: "/") else { throw refuse("it names no registry host") }
        let hostPart = rest[..<slash]
        var path = rest[rest.index(after: slash)...]
        guard hostPart.contains(".") || hostPart.contains(":") || hostPart == "localhost" else {
            throw refuse("'\(hostPart)' is not a registry host (it needs a dot, a port, or to be localhost)")
        }
        if let colon = hostPart.lastIndex(of: ":"), !hostPart.hasSuffix("]") {
            guard let port = UInt16(hostPart[hostPart.index(after: colon)...]), port > 0 else { throw refuse("the port is not a number") }
            self.port = port
            host = String(hostPart[..<colon])
        } else {
            host = String(hostPart)
        }
        if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        if let colon = path.lastIndex(of: ":") {
            let tag = String(path[path.index(after: colon)...])
            guard !tag.isEmpty, tag.count <= 128, tag.first.map({ $0.isLetter || $0.isNumber || $0 == "_" }) == true,
                  tag.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || "_.-".contains($0)) }) else {
                throw refuse("the tag '\(tag)' is not [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
            }
            self.tag = tag
            path = path[..<colon]
        }
        repository = String(path)
        let valid = repository.split(separator: "/", omittingEmptySubsequences: false).allSatisfy { component in
            guard let first = component.first, first.isASCII, first.isLowercase || first.isNumber else { return false }
            return component.allSatisfy { $0.isASCII && ($0.isLowercase || $0.isNumber || "._-".contains($0)) }
        }
        guard valid, repository.count <= 255 else {
            throw refuse("the repository '\(repository)' must be lowercase letters, digits and ._- in parts separated by /")
        }
    }
}
