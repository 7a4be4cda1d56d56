import Glibc
import StasisCore

/// Turns the current errno of a failed call into a StasisError that says what was being done to what.
/// One mapping for every call site: ENOSPC and EACCES get codes of their own because the user's fix differs.
public func systemError(_ action: String, _ subject: String, errno code: Int32 = errno) -> StasisError {
    let reason = String(cString: strerror(code))
    let cause = Errno(rawValue: code)
    switch code {
    case ENOSPC, EDQUOT:
        return StasisError(.noSpace, "\(action) \(subject): \(reason)", hint: "free space on that filesystem or write elsewhere", cause: cause)
    case EACCES, EPERM:
        return StasisError(.permission, "\(action) \(subject): \(reason)", hint: "stasis needs root (CAP_SYS_ADMIN) for checkpoint and restore",
                           cause: cause)
    default:
        return StasisError(.io, "\(action) \(subject): \(reason)", cause: cause)
    }
}

/// Retries a call interrupted by a signal, as swift-system does for every wrapped call.
@inline(__always)
public func retryingEINTR<T: BinaryInteger>(_ body: () -> T) -> T {
    while true {
        let result = body()
        if result == -1 && errno == EINTR { continue }
        return result
    }
}

extension String {
    /// The text of a NUL-terminated C buffer.
    public init(nulTerminated buffer: [CChar]) {
        self = String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}
