import Foundation

/// A value computed on its own thread (a command that must run while the test does something else).
// @unchecked Sendable: `result` is reached only under `lock`; `done` is signalled once it is set.
public final class DetachedResult<T>: @unchecked Sendable {
    private let lock = NSLock()
    private var result: Result<T, Error>?
    private let done = DispatchSemaphore(value: 0)
    public var isDone: Bool { lock.withLock { result != nil } }
    func set(_ value: Result<T, Error>) { lock.withLock { result = value }; done.signal() }
    /// Waits for the value (or the error thrown).
    public func value() throws -> T {
        done.wait()
        done.signal()
        return try lock.withLock { result! }.get()
    }
}

extension Thread {
    public static func detachedResult<T>(_ body: @escaping @Sendable () throws -> T) -> DetachedResult<T> {
        let box = DetachedResult<T>()
        let thread = Thread { box.set(Result { try body() }) }
        thread.start()
        return box
    }
}
