/// The one error type every stasis module throws.
///
/// A user who hits it must learn what was being done, to what (PID, file), what went wrong and what to do
/// next. `code` lets callers (and tests) tell failures apart without parsing text; new codes can be added
/// without breaking anyone, as with containerization's `ContainerizationError`.
public struct StasisError: Error, Sendable, CustomStringConvertible {
    public struct Code: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
        public let rawValue: String
        public init(rawValue: String) { self.rawValue = rawValue }
        public var description: String { rawValue }

        public static let invalidArgument = Code(rawValue: "invalid-argument")
        public static let processNotFound = Code(rawValue: "process-not-found")
        public static let directoryNotEmpty = Code(rawValue: "directory-not-empty")
        public static let criuMissing = Code(rawValue: "criu-missing")
        public static let criuTooOld = Code(rawValue: "criu-too-old")
        public static let criuFailed = Code(rawValue: "criu-failed")
        public static let manifestInvalid = Code(rawValue: "manifest-invalid")
        public static let manifestVersion = Code(rawValue: "manifest-version")
        public static let notACheckpoint = Code(rawValue: "not-a-checkpoint")
        public static let integrity = Code(rawValue: "integrity")
        public static let pidInUse = Code(rawValue: "pid-in-use")
        public static let hostMismatch = Code(rawValue: "host-mismatch")
        public static let noSpace = Code(rawValue: "no-space")
        public static let permission = Code(rawValue: "permission")
        public static let io = Code(rawValue: "io")
        public static let gpu = Code(rawValue: "gpu")
        public static let interrupted = Code(rawValue: "interrupted")
        /// The job was in a state that cannot be checkpointed just now (its tree kept changing); nothing was touched.
        public static let busy = Code(rawValue: "busy")
        /// A container runtime (runc) is missing or refused.
        public static let runtime = Code(rawValue: "runtime")
        /// A migration's receiver could not restore the job (it runs on at the source).
        public static let migrationFailed = Code(rawValue: "migration-failed")
    }

    public var code: Code
    /// What failed, in one sentence that names the PID or file.
    public var message: String
    /// What the user can do about it.
    public var hint: String?
    /// Lines quoted from a log (CRIU's), most relevant last.
    public var logExcerpt: [String]
    /// Where the full log is, when there is one.
    public var logPath: String?
    /// The error underneath, when this one wraps another (a Foundation or decoding error, kept for callers
    /// that look inside; the message already says what it means).
    public var cause: (any Error & Sendable)?

    public init(_ code: Code, _ message: String, hint: String? = nil, logExcerpt: [String] = [], logPath: String? = nil,
                cause: (any Error)? = nil) {
        self.code = code
        self.message = message
        self.hint = hint
        self.logExcerpt = logExcerpt
        self.logPath = logPath
        self.cause = cause as? any Error & Sendable
    }

    /// `error` itself when it is a StasisError, else one of `code` that says what it is and keeps it as its cause.
    public static func wrapping(_ error: any Error, as code: Code = .io) -> StasisError {
        (error as? StasisError) ?? StasisError(code, "\(error)", cause: error)
    }

    public var description: String {
        var text = message
        if !logExcerpt.isEmpty {
            text += "\n" + logExcerpt.map { "  | " + $0 }.joined(separator: "\n")
        }
        if let logPath { text += "\n  full log: \(logPath)" }
        if let hint { text += "\n  hint: \(hint)" }
        return text
    }

    /// The same error with more said after its message.
    public func appending(_ more: String) -> StasisError {
        var copy = self
        copy.message += more
        return copy
    }

    /// The same error with more context in front of its message ("dump of PID 42: ...").
    public func prefixed(_ context: String) -> StasisError {
        var copy = self
        copy.message = "\(context): \(message)"
        return copy
    }
}
