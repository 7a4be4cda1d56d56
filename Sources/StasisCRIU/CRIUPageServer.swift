import Foundation
import StasisCore
import StasisOS

/// The receiving end of CRIU's page-server protocol, so that a dump's memory reaches stasis once: CRIU
/// splices the pages it drains from the tree into a socket, and stasis cuts them into chunks as they arrive,
/// instead of CRIU writing pages-*.img and stasis reading it back.
///
/// The socket is one end of a socket pair, given to `criu swrk` as a descriptor (RPC `ps.fd`, which CRIU
/// takes only in swrk mode). The protocol, as CRIU 4.2's page-xfer.c speaks it: a 32-byte header per
/// command (`cmd` u32, padding, `nr_pages` u64, `vaddr` u64, `dst_id` u64, little-endian), the command's
/// flags in the upper 16 bits of `cmd`:
/// - OPEN2 (4): a pagemap image begins (`dst_id`: type in the low 8 bits, 1 a task's pagemap-ID.img, 2 a
///   shared mapping's pagemap-shmem-ID.img; the ID above); answered with one byte, 1 when a parent
///   checkpoint holds earlier pages (never here). OPEN (3) is the same unanswered.
/// - PARENT (5): is there a parent checkpoint? Answered with an int32, 0.
/// - ADD_F (6): one pagemap entry, its PE_* flags in `cmd`; with PE_PRESENT, `nr_pages` pages of data follow.
///   ADD (1) is ADD_F with PE_PRESENT, HOLE (2) with PE_PARENT.
/// - CLOSE (0x1023) or FORCE_CLOSE (0x1024, what CRIU sends on a socket it was given): all is sent; answered
///   with an int32 status, 0 when everything was taken. CRIU fails the dump (and thaws the tree) on any
///   other answer, on none, and on a socket that breaks.
/// The images that result are CRIU's own: pagemap-*.img here, as CRIU writes them (the common and pagemap
/// magics, then each protobuf message behind its u32 length), and pages-N.img as the streams handed to `sink`.
// @unchecked Sendable: `failures` is `Locked`; the rest is set once or belongs to the serving thread.
public final class CRIUPageServer: @unchecked Sendable {
    /// Where the pages go: `receive` takes `count` more bytes of the named pages image from the socket,
    /// `end` says it is complete. An error from either ends the dump.
    public struct Sink: Sendable {
        public var receive: @Sendable (_ name: String, _ source: FileDescriptor, _ count: Int) throws -> Void
        public var end: @Sendable (_ name: String) throws -> Void
        public init(receive: @escaping @Sendable (String, FileDescriptor, Int) throws -> Void, end: @escaping @Sendable (String) throws -> Void) {
            self.receive = receive
            self.end = end
        }
    }

    private let criuEnd: FileDescriptor
    private let handedOver = Locked(false)
    private let socket: FileDescriptor
    private let directory: String
    private let sink: Sink
    private let pageSize: Int
    private let failures = Locked<[Error]>([])
    private let received = Locked<UInt64>(0)
    private let served = DispatchSemaphore(value: 0)

    /// Pagemap images are written into `directory` (the dump's images); pages go to `sink`.
    public init(imagesDirectory directory: String, sink: Sink) throws {
        (socket, criuEnd) = try attempt("cannot create a socket pair for", "CRIU's pages") { try UnixSocket.streamPair() }
        self.directory = directory
        self.sink = sink
        pageSize = Int(sysconf(Int32(_SC_PAGESIZE)))
        let thread = Thread { [self] in
            serve()
            served.signal()
        }
        thread.name = "stasis-page-server"
        thread.start()
    }

    /// CRIU's end of the socket, for `CRIUService.dump`, which closes it once CRIU has it.
    public func descriptorForCRIU() -> FileDescriptor {
        handedOver.withLock { $0 = true }
        return criuEnd
    }

    /// Bytes of pages received so far.
    public var receivedBytes: UInt64 { received.current }

    /// Ends the session (call it once CRIU has returned: a session CRIU finished is over by then, and what is
    /// left of one it broke off is of no use), waits for the serving thread and returns what failed, first first.
    public func finish() -> [Error] {
        if !handedOver.current { criuEnd.closeQuietly() }
        socket.shutdown()
        served.wait()
        socket.closeQuietly()
        return failures.current
    }

    // MARK: the session

    private enum Command: UInt32 {
        case add = 1, hole = 2, open = 3, open2 = 4, parent = 5, addFlagged = 6, get = 7
        case close = 0x1023, forceClose = 0x1024
    }

    private struct Header {
        var command: UInt32
        var flags: UInt32
        var pages: UInt64
        var address: UInt64
        var destination: UInt64
    }

    /// The pagemap image being written and the pages image its entries' data go to.
    private struct OpenImage {
        var destination: UInt64
        var pagemapName: String
        var pagesName: String
        var pagemap: [UInt8]
    }

    static let presentFlag: UInt32 = 1 << 2
    static let parentFlag: UInt32 = 1 << 0

    private func serve() {
        var open: OpenImage?
        var pagesImages: UInt32 = 0
        do {
            while let header = try readHeader() {
                guard let command = Command(rawValue: header.command) else {
                    throw StasisError(.criuFailed, "CRIU's page server protocol: unknown command \(header.command)")
                }
                switch command {
                case .open, .open2:
                    try close(&open)
                    pagesImages += 1
                    open = try begin(header.destination, pagesID: pagesImages)
                    if command == .open2 { try reply([0]) }
                case .parent:
                    try reply([0, 0, 0, 0])
                case .add, .hole, .addFlagged:
                    let flags = command == .add ? Self.presentFlag : command == .hole ? Self.parentFlag : header.flags
                    if open?.destination != header.destination {
                        // CRIU before OPEN existed wrote without one; CRIU 4 never does, but the image is still clear.
                        try close(&open)
                        pagesImages += 1
                        open = try begin(header.destination, pagesID: pagesImages)
                    }
                    try add(header, flags: flags, to: &open!)
                case .close, .forceClose:
                    try close(&open)
                    try reply([0, 0, 0, 0])
                    return
                case .get:
                    throw StasisError(.criuFailed, "CRIU's page server protocol: a page request (GET) during a dump")
                }
            }
            // CRIU went away without closing: a dump that failed on its side (it reports why) or was killed.
        } catch {
            failures.withLock { $0.append(error) }
            // A socket that breaks under CRIU fails its dump, and the tree is thawed.
            socket.shutdown()
        }
    }

    /// The next header; nil when CRIU closed the connection between two.
    private func readHeader() throws -> Header? {
        var raw = [UInt8](repeating: 0, count: 32)
        let got = try raw.withUnsafeMutableBytes { buffer in
            try attempt("cannot read", "CRIU's page server socket") { try socket.read(filling: buffer) }
        }
        if got == 0 { return nil }
        guard got == raw.count else { throw StasisError(.criuFailed, "CRIU's page server protocol: a header cut short (\(got) bytes)") }
        func u64(_ at: Int) -> UInt64 { (0..<8).reduce(0) { $0 | UInt64(raw[at + $1]) << (8 * UInt64($1)) } }
        let word = UInt32(truncatingIfNeeded: u64(0))
        return Header(command: word & 0xffff, flags: word >> 16, pages: u64(8), address: u64(16), destination: u64(24))
    }

    private func reply(_ bytes: [UInt8]) throws {
        // MSG_NOSIGNAL: a CRIU that died is an error here, not a SIGPIPE that kills stasis.
        if let failure = bytes.withUnsafeBytes({ StreamSocket.send(socket, $0) }) {
            throw StasisError(.criuFailed, "cannot answer CRIU's page server socket: \(failure.reason)")
        }
    }

    private func begin(_ destination: UInt64, pagesID: UInt32) throws -> OpenImage {
        let id = destination >> 8
        let pagemapName = switch destination & 0xff {
        case 1: "pagemap-\(id).img"
        case 2: "pagemap-shmem-\(id).img"
        default: throw StasisError(.criuFailed, "CRIU's page server protocol: unknown pagemap type \(destination & 0xff)")
        }
        var pagemap: [UInt8] = []
        Self.appendLittleEndian(Self.commonMagic, to: &pagemap)
        Self.appendLittleEndian(Self.pagemapMagic, to: &pagemap)
        // pagemap_head { required uint32 pages_id = 1; }
        Self.appendMessage([0x08] + Self.varint(UInt64(pagesID)), to: &pagemap)
        return OpenImage(destination: destination, pagemapName: pagemapName, pagesName: "pages-\(pagesID).img", pagemap: pagemap)
    }

    private func add(_ header: Header, flags: UInt32, to image: inout OpenImage) throws {
        guard header.pages > 0, header.pages < (1 << 36) / UInt64(pageSize) else {
            throw StasisError(.criuFailed, "CRIU's page server protocol: an entry of \(header.pages) pages")
        }
        // pagemap_entry { vaddr = 1; compat_nr_pages = 2 (required, 0 as CRIU 4 writes it); flags = 4; nr_pages = 5 }
        Self.appendMessage([0x08] + Self.varint(header.address) + [0x10, 0x00, 0x20] + Self.varint(UInt64(flags))
                           + [0x28] + Self.varint(header.pages), to: &image.pagemap)
        guard flags & Self.presentFlag != 0 else { return }
        let count = Int(header.pages) * pageSize
        try sink.receive(image.pagesName, socket, count)
        received.withLock { $0 += UInt64(count) }
        try FaultInjection.check("pages")
    }

    /// Writes the open pagemap image (private, as every image) and ends its pages stream.
    private func close(_ image: inout OpenImage?) throws {
        guard let done = image else { return }
        image = nil
        try sink.end(done.pagesName)
        let path = directory + "/" + done.pagemapName
        let fd = try attempt("cannot create", path) {
            try FileDescriptor.open(path, .writeOnly, options: [.create, .exclusiveCreate], permissions: [.ownerReadWrite])
        }
        defer { fd.closeQuietly() }
        try done.pagemap.withUnsafeBytes { bytes in try attempt("cannot write", path) { try fd.write(all: bytes) } }
    }

    // MARK: CRIU's image encoding

    static let commonMagic: UInt32 = 0x5456_4319
    static let pagemapMagic: UInt32 = 0x5608_4025

    static func appendLittleEndian(_ value: UInt32, to bytes: inout [UInt8]) {
        for shift in stride(from: 0, to: 32, by: 8) { bytes.append(UInt8(truncatingIfNeeded: value >> UInt32(shift))) }
    }

    static func appendMessage(_ message: [UInt8], to bytes: inout [UInt8]) {
        appendLittleEndian(UInt32(message.count), to: &bytes)
        bytes += message
    }

    static func varint(_ value: UInt64) -> [UInt8] {
        var rest = value, out: [UInt8] = []
        while rest >= 0x80 {
            out.append(UInt8(rest & 0x7f) | 0x80)
            rest >>= 7
        }
        out.append(UInt8(rest))
        return out
    }
}
