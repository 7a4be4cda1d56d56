import Crypto
import Foundation
import StasisCore
import StasisOS

/// One repository of an OCI registry, through the distribution API (`/v2/`): blobs checked, sent and
/// fetched, manifests put and got. Threads each take a `RegistrySession` (their own connection); they share
/// the registry's answer to authentication (a bearer token, or basic credentials), found once.
// @unchecked Sendable: its state after init is the `Locked` authorization; the TLS context is shareable.
public final class RegistryClient: @unchecked Sendable {
    public let reference: RegistryReference
    let endpoint: HTTPEndpoint
    let tls: TLSContext?
    let credentials: RegistryCredentials?
    /// The Authorization header that worked last (a bearer token or basic credentials), for every session.
    let authorization = Locked<String?>(nil)
    /// The most a manifest may hold (CNCF distribution's default limit).
    public static let maxManifestBytes = 4 << 20

    /// `plainHTTP`: speak HTTP without TLS (only when asked); `caFile`: CA certificates to accept besides
    /// the system's.
    public init(_ reference: RegistryReference, plainHTTP: Bool, caFile: String?, credentials: RegistryCredentials?) throws {
        self.reference = reference
        endpoint = HTTPEndpoint(secure: !plainHTTP, host: reference.host, port: reference.port ?? (plainHTTP ? 80 : 443))
        tls = plainHTTP ? nil : try TLSContext(webCA: caFile)
        self.credentials = credentials
    }

    public func session() -> RegistrySession { RegistrySession(self) }
}

/// One thread's connection to the registry (and to wherever it redirects blob downloads).
public final class RegistrySession {
    let client: RegistryClient
    private var connections: [HTTPEndpoint: HTTPConnection] = [:]
    private var repository: String { client.reference.repository }

    init(_ client: RegistryClient) { self.client = client }

    deinit { for connection in connections.values { connection.close() } }

    // MARK: blobs

    /// Whether the repository has the blob (HEAD).
    public func hasBlob(_ digest: String) throws -> Bool {
        let response = try send("HEAD", "/v2/\(repository)/blobs/\(digest)", maxBody: 0, what: "checking blob \(digest)")
        switch response.status {
        case 200: return true
        case 404: return false
        default: throw failure(response, "checking blob \(digest)")
        }
    }

    /// How a blob got into the repository.
    public enum BlobPush: Sendable { case present, mounted, sent }

    /// Uploads one blob whole (a POST for an upload, then one PUT with its digest, which the registry checks).
    /// With `mountFrom`, the POST first asks the registry to mount the blob from that repository of its own
    /// (cross-repository mount: nothing is sent when it has it there); a registry that cannot answers with an
    /// upload, which then takes the bytes.
    @discardableResult
    public func pushBlob(_ bytes: UnsafeRawBufferPointer, digest: String, mountFrom: String? = nil) throws -> BlobPush {
        let query = mountFrom.map { "?mount=\(digest)&from=\($0)" } ?? ""
        let start = try send("POST", "/v2/\(repository)/blobs/uploads/\(query)", body: UnsafeRawBufferPointer(start: nil, count: 0), maxBody: 1 << 16,
                             what: "starting the upload of blob \(digest)")
        if mountFrom != nil, start.status == 201 { return .mounted }
        // A mount the registry refuses outright (no pull access to that repository, or it is gone) is no reason
        // to fail the push: the blob is uploaded as without one.
        if mountFrom != nil, start.status != 202 { return try pushBlob(bytes, digest: digest, mountFrom: nil) }
        guard start.status == 202, let location = start.header("location") else { throw failure(start, "starting the upload of blob \(digest)") }
        let target = location + (location.contains("?") ? "&" : "?") + "digest=" + digest
        let put = try send("PUT", target, headers: [("Content-Type", "application/octet-stream")], body: bytes, maxBody: 1 << 16,
                           what: "uploading blob \(digest)")
        guard put.status == 201 else { throw failure(put, "uploading blob \(digest) (\(bytes.count) bytes)") }
        return .sent
    }

    /// Uploads the blob unless the repository has it already (or it can be mounted from `mountFrom`).
    @discardableResult
    public func pushBlobIfMissing(_ bytes: UnsafeRawBufferPointer, digest: String, mountFrom: String? = nil) throws -> BlobPush {
        if try hasBlob(digest) { return .present }
        return try pushBlob(bytes, digest: digest, mountFrom: mountFrom)
    }

    /// A blob's bytes, checked against its digest; at most `maxBytes`.
    public func blob(_ digest: String, maxBytes: Int) throws -> [UInt8] {
        let response = try send("GET", "/v2/\(repository)/blobs/\(digest)", maxBody: maxBytes, what: "fetching blob \(digest)")
        guard response.status == 200 else { throw failure(response, "fetching blob \(digest)") }
        let actual = BlobDigest.of(response.body)
        guard actual == digest else {
            throw StasisError(.integrity, "blob \(digest) from \(client.reference.registry)/\(repository) does not match its digest (it hashes to \(actual))",
                              hint: "the registry's copy is damaged, or something between changed it; nothing was used")
        }
        return response.body
    }

    // MARK: manifests

    /// Puts a manifest under `reference` (a tag); returns its digest.
    @discardableResult
    public func putManifest(_ bytes: [UInt8], mediaType: String, reference: String) throws -> String {
        let response = try bytes.withUnsafeBytes {
            try send("PUT", "/v2/\(repository)/manifests/\(reference)", headers: [("Content-Type", mediaType)], body: $0, maxBody: 1 << 16,
                     what: "putting the manifest \(reference)")
        }
        guard response.status == 201 else { throw failure(response, "putting the manifest \(client.reference.registry)/\(repository):\(reference)") }
        return response.header("docker-content-digest") ?? BlobDigest.of(bytes)
    }

    /// The manifest named by `reference` (a tag or a digest): its bytes, media type and digest. A digest
    /// reference is checked against the bytes.
    public func manifest(_ reference: String, accept: [String]) throws -> (bytes: [UInt8], mediaType: String, digest: String) {
        let response = try send("GET", "/v2/\(repository)/manifests/\(reference)", headers: [("Accept", accept.joined(separator: ", "))],
                                maxBody: RegistryClient.maxManifestBytes, what: "fetching the manifest \(reference)")
        guard response.status == 200 else {
            if response.status == 404 {
                throw StasisError(.invalidArgument, "\(client.reference) is not in the registry (404 for its manifest)",
                                  hint: "check the repository and tag (`skopeo list-tags docker://\(client.reference.registry)/\(repository)`)")
            }
            throw failure(response, "fetching the manifest \(client.reference)")
        }
        let digest = BlobDigest.of(response.body)
        if reference.hasPrefix("sha256:"), digest != reference {
            throw StasisError(.integrity, "the manifest of \(client.reference) hashes to \(digest), not \(reference)")
        }
        return (response.body, response.header("content-type") ?? "", digest)
    }


    // MARK: the exchange: authentication, redirects

    /// How often a request the registry answers 429 or 503 (too busy) is sent again, and the first pause
    /// (doubled each time, or the registry's Retry-After in seconds, up to `maxBackOff`).
    static let busyRetries = 5
    static let firstBackOff = 0.5
    static let maxBackOff = 10.0

    /// One request to the registry, authenticated as the registry asks (once per 401 challenge), following
    /// redirects (GET and HEAD) without the registry's credentials to another host, and backing off while
    /// the registry says it is too busy (429, 503): a fleet pulling at once must slow down, not fail.
    private func send(_ method: String, _ target: String, headers: [(String, String)] = [], body: UnsafeRawBufferPointer? = nil,
                      maxBody: Int, what: String) throws -> HTTPResponse {
        var endpoint = client.endpoint
        var target = target
        if let absolute = HTTPEndpoint.parse(url: target) { (endpoint, target) = absolute }
        var challenged = false
        var busy = 0
        for _ in 0..<(6 + Self.busyRetries) {
            var all = headers
            if endpoint == client.endpoint, let authorization = client.authorization.withLock({ $0 }) { all.append(("Authorization", authorization)) }
            let response = try connection(endpoint).exchange(method, target, headers: all, body: body, maxBody: maxBody)
            if response.status == 401, endpoint == client.endpoint, !challenged {
                challenged = true
                try authenticate(response, what: what)
                continue
            }
            if [301, 302, 303, 307, 308].contains(response.status), method == "GET" || method == "HEAD", let location = response.header("location") {
                if let absolute = HTTPEndpoint.parse(url: location) {
                    (endpoint, target) = absolute
                } else if location.hasPrefix("/") {
                    target = location
                } else {
                    throw StasisError(.io, "\(what): the registry redirected to \(Format.printable(location)), which stasis cannot follow")
                }
                continue
            }
            if response.status == 429 || response.status == 503, busy < Self.busyRetries {
                let asked = response.header("retry-after").flatMap(Double.init)
                Thread.sleep(forTimeInterval: min(Self.maxBackOff, asked ?? Self.firstBackOff * Double(1 << busy)))
                busy += 1
                continue
            }
            return response
        }
        throw StasisError(.io, "\(what): too many redirects or challenges from \(client.reference.registry)")
    }

    private func connection(_ endpoint: HTTPEndpoint) throws -> HTTPConnection {
        if let connection = connections[endpoint] { return connection }
        // Another host (a redirect to object storage) is reached over TLS with the system's CAs too.
        let made = HTTPConnection(endpoint, tls: try client.tls ?? (endpoint.secure ? TLSContext(webCA: nil) : nil))
        connections[endpoint] = made
        return made
    }

    /// Answers a 401: basic credentials, or a bearer token from the realm the challenge names (asked with
    /// the credentials, if there are any: anonymous pulls get a token too).
    private func authenticate(_ response: HTTPResponse, what: String) throws {
        let challenge = response.header("www-authenticate") ?? ""
        let lower = challenge.lowercased()
        if lower.hasPrefix("basic") {
            guard let credentials = client.credentials else { throw refused(response, what: what) }
            client.authorization.withLock { $0 = credentials.basic }
            return
        }
        guard lower.hasPrefix("bearer") else { throw refused(response, what: what) }
        let parameters = Self.parameters(String(challenge.dropFirst("bearer".count)))
        guard let realm = parameters["realm"], var components = URLComponents(string: realm) else {
            throw StasisError(.io, "\(what): the registry asked for a token without saying where to get one (\(Format.printable(challenge)))")
        }
        var query = components.queryItems ?? []
        if let service = parameters["service"] { query.append(URLQueryItem(name: "service", value: service)) }
        if let scope = parameters["scope"] { query.append(URLQueryItem(name: "scope", value: scope)) }
        components.queryItems = query
        guard let url = components.string, let (endpoint, target) = HTTPEndpoint.parse(url: url) else {
            throw StasisError(.io, "\(what): the token realm \(Format.printable(realm)) is not an http(s) URL")
        }
        let headers = client.credentials.map { [("Authorization", $0.basic)] } ?? []
        let answer = try connection(endpoint).exchange("GET", target, headers: headers, maxBody: 1 << 20)
        guard answer.status == 200 else { throw refused(answer, what: what) }
        // An answer that is not JSON is no token: said as such below.
        guard let object = try? JSONSerialization.jsonObject(with: Data(answer.body)) as? [String: Any],
              let token = (object["token"] as? String) ?? (object["access_token"] as? String) else {
            throw StasisError(.io, "\(what): the token service \(endpoint.authority) answered without a token")
        }
        client.authorization.withLock { $0 = "Bearer " + token }
    }

    private func refused(_ response: HTTPResponse, what: String) -> StasisError {
        let registry = client.reference.registry
        let hint = client.credentials.map { "the credentials for \(registry) in \($0.source) were refused: log in again (`podman login \(registry)`)" }
            ?? "log in first (`podman login \(registry)`, or set REGISTRY_AUTH_FILE to an auth.json with an entry for \(registry))"
        return StasisError(.permission, "\(what): \(registry) refused access (\(response.status))", hint: hint)
    }

    /// A registry's answer as an error: what was being done, the status, and its error text.
    func failure(_ response: HTTPResponse, _ what: String) -> StasisError {
        if response.status == 401 || response.status == 403 { return refused(response, what: what) }
        var detail = ""
        // A body that is not the registry's JSON error is quoted as text instead.
        if let object = try? JSONSerialization.jsonObject(with: Data(response.body)) as? [String: Any],
           let errors = object["errors"] as? [[String: Any]] {
            detail = errors.compactMap { error in
                [error["code"] as? String, error["message"] as? String].compactMap { $0 }.joined(separator: ": ")
            }.joined(separator: "; ")
        } else if !response.body.isEmpty {
            detail = Format.printable(response.text.trimmingCharacters(in: .whitespacesAndNewlines))
        }
        let hint = response.status >= 500 ? "the registry failed; try again (what was sent is kept: a rerun sends only what is missing)" : nil
        return StasisError(.io, "\(what): \(client.reference.registry) answered \(response.status)" + (detail.isEmpty ? "" : " (\(detail.prefix(300)))"), hint: hint)
    }

    /// `key="value", key=value` pairs of an authentication challenge.
    static func parameters(_ text: String) -> [String: String] {
        var result: [String: String] = [:]
        var rest = Substring(text)
        while let equals = rest.firstIndex(of: "=") {
            let key = rest[..<equals].trimmingCharacters(in: CharacterSet(charactersIn: " ,")).lowercased()
            rest = rest[rest.index(after: equals)...]
            let value: Substring
            if rest.first == "\"" {
                rest = rest.dropFirst()
                let end = rest.firstIndex(of: "\"") ?? rest.endIndex
                value = rest[..<end]
                rest = end < rest.endIndex ? rest[rest.index(after: end)...] : ""
            } else {
                let end = rest.firstIndex(of: ",") ?? rest.endIndex
                value = rest[..<end]
                rest = rest[end...]
            }
            result[key] = String(value)
        }
        return result
    }
}
