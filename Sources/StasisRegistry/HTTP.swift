import Foundation
import StasisCore
import StasisOS

/// Where an HTTP request goes: scheme, host and port, as a URL names them.
struct HTTPEndpoint: Hashable, Sendable {
    var secure: Bool
    var host: String
    var port: UInt16

    /// "host:port", brackets around an IPv6 address.
    var authority: String { (host.contains(":") ? "[\(host)]" : host) + ":\(port)" }

    /// The endpoint and request target of an absolute URL ("https://host[:port]/path?query"), or nil.
    static func parse(url: String) -> (endpoint: HTTPEndpoint, target: String)? {
        guard let components = URLComponents(string: url), let scheme = components.scheme?.lowercased(),
              scheme == "https" || scheme == "http", let host = components.host, !host.isEmpty else { return nil }
        let port = components.port.flatMap { UInt16(exactly: $0) } ?? (scheme == "https" ? 443 : 80)
        var target = components.percentEncodedPath.isEmpty ? "/" : components.percentEncodedPath
        if let query = components.percentEncodedQuery { target += "?" + query }
        return (HTTPEndpoint(secure: scheme == "https", host: host, port: port), target)
    }
}

struct HTTPResponse {
    var status: Int
    /// Header names in lower case, in the order they came.
    var headers: [(name: String, value: String)]
    var body: [UInt8]

    func header(_ name: String) -> String? { headers.first { $0.name == name }?.value }
    var text: String { String(decoding: body.prefix(2000), as: UTF8.self) }
}

/// HTTP/1.1 to one endpoint, one exchange at a time, over a connection kept alive between them (with TLS for
/// https, its certificate checked by `tls`). Bodies are read whole, up to a limit the caller sets: what a
/// registry answers is a manifest, a token or a chunk, all bounded.
final class HTTPConnection {
    let endpoint: HTTPEndpoint
    private let tls: TLSContext?
    private var connection: TCPConnection?
    /// Bytes read past the end of the last response.
    private var pending: [UInt8] = []
    static let timeoutSeconds = 60

    init(_ endpoint: HTTPEndpoint, tls: TLSContext?) {
        self.endpoint = endpoint
        self.tls = tls
    }

    /// Sends one request and reads its response. A kept-alive connection the server closed meanwhile is
    /// opened again once and the request repeated (a body is a buffer, so it can be).
    func exchange(_ method: String, _ target: String, headers: [(String, String)] = [], body: UnsafeRawBufferPointer? = nil,
                  maxBody: Int) throws -> HTTPResponse {
        let reused = connection != nil
        do {
            return try attempt(method, target, headers: headers, body: body, maxBody: maxBody)
        } catch let error as StasisError where reused && error.code == .io {
            close()
            return try attempt(method, target, headers: headers, body: body, maxBody: maxBody)
        }
    }

    func close() {
        connection?.shutdown()
        connection = nil
        pending = []
    }

    private func connect() throws -> TCPConnection {
        if let connection { return connection }
        let made = try TCPConnection.connect(to: endpoint.authority, seconds: Self.timeoutSeconds, hint: "is the registry running there, and can this host reach it?")
        made.setTimeout(seconds: Self.timeoutSeconds)
        if endpoint.secure {
            guard let tls else { throw StasisError(.invalidArgument, "no TLS context for https://\(endpoint.authority)") }
            try made.secure(with: tls, host: endpoint.host,
                            hint: "a registry with a certificate of its own CA: give the CA with --ca FILE; one that speaks plain HTTP: --plain-http")
        }
        connection = made
        return made
    }

    private func attempt(_ method: String, _ target: String, headers: [(String, String)], body: UnsafeRawBufferPointer?,
                         maxBody: Int) throws -> HTTPResponse {
        let connection = try connect()
        var head = "\(method) \(target) HTTP/1.1\r\nHost: \(endpoint.authority)\r\nUser-Agent: stasis\r\n"
        for (name, value) in headers { head += "\(name): \(value)\r\n" }
        if body != nil || method == "PUT" || method == "POST" || method == "PATCH" { head += "Content-Length: \(body?.count ?? 0)\r\n" }
        head += "\r\n"
        let more = !(body?.isEmpty ?? true)
        try Array(head.utf8).withUnsafeBytes { try connection.send($0, more: more) }
        if let body, !body.isEmpty { try connection.send(body) }
        var response = try readHead(connection)
        let noBody = method == "HEAD" || response.status == 204 || response.status == 304 || (100..<200).contains(response.status)
        if !noBody {
            if response.header("transfer-encoding")?.lowercased().contains("chunked") == true {
                response.body = try readChunked(connection, maxBody: maxBody)
            } else if let text = response.header("content-length") {
                guard let length = Int(text), length >= 0 else {
                    close()
                    throw StasisError(.io, "\(method) \(target) at \(endpoint.authority): the answer's Content-Length \(Format.printable(String(text.prefix(40)))) is not a length")
                }
                guard length <= maxBody else {
                    close()
                    throw StasisError(.io, "\(method) \(target) at \(endpoint.authority): the answer holds \(length) bytes, more than the \(maxBody) allowed")
                }
                response.body = try read(connection, count: length)
            } else {
                response.body = try readToEnd(connection, maxBody: maxBody)
                self.close()
            }
        }
        if response.header("connection")?.lowercased() == "close" { close() }
        return response
    }

    // MARK: reading

    private func fill(_ connection: TCPConnection) throws {
        var buffer = [UInt8](repeating: 0, count: 64 << 10)
        let got = try buffer.withUnsafeMutableBytes { try connection.receiveSome(into: $0) }
        guard got > 0 else { throw StasisError(.io, "\(endpoint.authority) closed the connection") }
        pending.append(contentsOf: buffer[0..<got])
    }

    private func readLine(_ connection: TCPConnection) throws -> String {
        while true {
            if let end = pending.firstIndex(of: 0x0A) {
                let line = pending[..<end]
                pending.removeFirst(end + 1)
                return String(decoding: line.last == 0x0D ? line.dropLast() : line, as: UTF8.self)
            }
            guard pending.count < 64 << 10 else { throw StasisError(.io, "\(endpoint.authority) sent a header line over 64 KiB") }
            try fill(connection)
        }
    }

    private func readHead(_ connection: TCPConnection) throws -> HTTPResponse {
        let statusLine = try readLine(connection)
        let parts = statusLine.split(separator: " ", maxSplits: 2)
        guard parts.count >= 2, parts[0].hasPrefix("HTTP/1."), let status = Int(parts[1]) else {
            close()
            throw StasisError(.io, "\(endpoint.authority) does not answer in HTTP/1.1 (it sent \(Format.printable(String(statusLine.prefix(80)))))",
                              hint: endpoint.secure ? "does it speak plain HTTP? then --plain-http" : "does it speak HTTPS only? then leave out --plain-http")
        }
        var headers: [(String, String)] = []
        while true {
            let line = try readLine(connection)
            if line.isEmpty { break }
            guard headers.count < 200, let colon = line.firstIndex(of: ":") else { continue }
            headers.append((line[..<colon].lowercased(), line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)))
        }
        if (100..<200).contains(status) { return try readHead(connection) }
        return HTTPResponse(status: status, headers: headers.map { (name: $0.0, value: $0.1) }, body: [])
    }

    private func read(_ connection: TCPConnection, count: Int) throws -> [UInt8] {
        if pending.count >= count {
            defer { pending.removeFirst(count) }
            return Array(pending[0..<count])
        }
        var body = pending
        pending = []
        body.reserveCapacity(count)
        let missing = count - body.count
        body.append(contentsOf: [UInt8](repeating: 0, count: missing))
        try body.withUnsafeMutableBytes { try connection.receive(into: UnsafeMutableRawBufferPointer(rebasing: $0[(count - missing)...])) }
        return body
    }

    private func readChunked(_ connection: TCPConnection, maxBody: Int) throws -> [UInt8] {
        var body: [UInt8] = []
        while true {
            let line = try readLine(connection)
            guard let size = Int(line.split(separator: ";").first.map(String.init)?.trimmingCharacters(in: .whitespaces) ?? "", radix: 16), size >= 0 else {
                close()
                throw StasisError(.io, "\(endpoint.authority) sent a malformed chunked body")
            }
            if size == 0 {
                while !(try readLine(connection)).isEmpty {}  // trailers
                return body
            }
            guard size <= maxBody - body.count else {
                close()
                throw StasisError(.io, "\(endpoint.authority) sent an answer larger than the \(maxBody) bytes allowed")
            }
            body.append(contentsOf: try read(connection, count: size))
            _ = try readLine(connection)
        }
    }

    private func readToEnd(_ connection: TCPConnection, maxBody: Int) throws -> [UInt8] {
        var body = pending
        pending = []
        var buffer = [UInt8](repeating: 0, count: 64 << 10)
        while true {
            let got = try buffer.withUnsafeMutableBytes { try connection.receiveSome(into: $0) }
            if got == 0 { return body }
            guard body.count + got <= maxBody else {
                throw StasisError(.io, "\(endpoint.authority) sent an answer larger than the \(maxBody) bytes allowed")
            }
            body.append(contentsOf: buffer[0..<got])
        }
    }
}
