import Foundation

// The concurrency kit: the few shapes stasis's threads share state through. Everything that runs on several
// threads uses these instead of a lock of its own. Each type is `@unchecked Sendable` for one reason: its
// mutable state is reached only while its lock (an NSLock, or a Monitor's NSCondition) is held.

/// A value that several threads read and change, always under its lock.
public final class Locked<Value>: @unchecked Sendable {
    private let lock = NSLock()
    private var value: Value

    public init(_ value: Value) { self.value = value }

    public func withLock<T>(_ body: (inout Value) throws -> T) rethrows -> T {
        lock.lock()
        defer { lock.unlock() }
        return try body(&value)
    }

    public var current: Value { withLock { $0 } }
}

/// A section of code that one thread at a time runs, guarding no value of its own: what must not interleave
/// is an action on something outside (messages sent on one socket, lines written to one log). Where there
/// is a value to guard, `Locked` holds it instead.
public final class CriticalSection: @unchecked Sendable {
    private let lock = NSLock()

    public init() {}

    public func run<T>(_ body: () throws -> T) rethrows -> T {
        lock.lock()
        defer { lock.unlock() }
        return try body()
    }
}

extension Locked where Value: BinaryInteger {
    /// Adds to a counter (bytes moved, for a progress display).
    public func add(_ amount: Value) { withLock { $0 += amount } }
}

extension Locked where Value == Int {
    /// The next index below `count` for whichever worker asks first (nil once all are taken): how workers
    /// share a list of jobs.
    public func takeNext(below count: Int) -> Int? {
        withLock { next in
            guard next < count else { return nil }
            defer { next += 1 }
            return next
        }
    }
}

/// A lock that threads also wait on, for state that one thread waits for another to change (a queue with room
/// or items, a slot decoded): its owner keeps that state beside the monitor and reaches it only inside
/// `withLock`. Where no thread waits, `Locked` is simpler.
public final class Monitor: @unchecked Sendable {
    private let condition = NSCondition()

    public init() {}

    public func withLock<T>(_ body: () throws -> T) rethrows -> T {
        condition.lock()
        defer { condition.unlock() }
        return try body()
    }

    /// Only inside `withLock`'s body: gives up the lock until a `signal` or `broadcast`, then takes it back. Call
    /// it in a loop that checks again what it waits for: a wake may be spurious, or another thread may be first.
    public func wait() { condition.wait() }

    /// Only inside `withLock`'s body, after changing what waiters check (outside it, a waiter between its check
    /// and its `wait` would miss the wake): wakes one waiter, so only where any waiter can use the change.
    public func signal() { condition.signal() }

    /// Only inside `withLock`'s body, after changing what waiters check: wakes every waiter.
    public func broadcast() { condition.broadcast() }
}

/// A first-in first-out queue between threads: `push` waits while it is full (when it has a capacity), `pop`
/// waits while it is empty; once closed, `pop` drains what is left and then returns nil, and `push` drops.
public final class BlockingQueue<Element>: @unchecked Sendable {
    private let condition = Monitor()
    private var items: [Element] = []
    private var head = 0
    private var closed = false
    private let capacity: Int

    /// `capacity`: the most items held at once (Int.max: unbounded).
    public init(capacity: Int = .max, _ initial: [Element] = []) {
        self.capacity = capacity
        items = initial
    }

    /// Appends `item`, waiting for room; false when the queue was closed (the item is dropped).
    @discardableResult
    public func push(_ item: Element) -> Bool {
        condition.withLock {
            while items.count - head >= capacity && !closed { condition.wait() }
            guard !closed else { return false }
            items.append(item)
            // One waiter is enough, and only one kind waits at a time: pops wait only while the queue is empty,
            // pushes only while it is full. A broadcast would wake every worker for each item (the agents'
            // transfers push thousands a second).
            condition.signal()
            return true
        }
    }

    /// The oldest item, waiting for one; nil once the queue is closed and empty, or at once when it is closed
    /// and `draining` is false (a pool of free slots whose user has finished).
    public func pop(draining: Bool = true) -> Element? {
        condition.withLock {
            while head == items.count && !closed { condition.wait() }
            guard head < items.count, draining || !closed else { return nil }
            let item = items[head]
            head += 1
            // Drop what was taken now and then, so a long transfer does not keep every item.
            if head > 4096 { items.removeFirst(head); head = 0 }
            if capacity != .max { condition.signal() }  // room for a waiting push
            return item
        }
    }

    /// Wakes every waiter: pushes end, pops drain and then end.
    public func close() {
        condition.withLock {
            closed = true
            condition.broadcast()
        }
    }

    public var count: Int { condition.withLock { items.count - head } }
}

/// Names still to come from a producer on another thread (chunks a pull fetches while a restore already reads
/// them): `wait(for:)` blocks while a name is pending and throws once the producer has failed, so a reader
/// never waits for what will not come.
public final class PendingNames: @unchecked Sendable {
    private let condition = Monitor()
    private var pending: Set<String>
    private var failure: Error?

    public init(_ names: Set<String>) { pending = names }

    /// Whether `name` is still to come.
    public func isPending(_ name: String) -> Bool { condition.withLock { pending.contains(name) } }

    public var remaining: Int { condition.withLock { pending.count } }

    /// `names` are here: their readers go on.
    public func arrived<Names: Sequence>(_ names: Names) where Names.Element == String {
        condition.withLock {
            for name in names { pending.remove(name) }
            condition.broadcast()
        }
    }

    /// Nothing more will come: every reader waiting, and every later one, gets `error`.
    public func fail(_ error: Error) {
        condition.withLock {
            if failure == nil { failure = error }
            condition.broadcast()
        }
    }

    /// Returns once `name` is not pending (at once for a name never promised); throws the producer's failure
    /// if it is still pending when the producer fails.
    public func wait(for name: String) throws {
        try condition.withLock {
            while pending.contains(name) {
                if let failure { throw failure }
                condition.wait()
            }
        }
    }
}

/// The first failure among threads that work together. A cause (an error the work itself found: a damaged
/// chunk, a full disk, a peer's own error message) wins over a symptom (a connection that ended because another
/// thread shut it down), whichever came first.
public final class FirstFailure: @unchecked Sendable {
    private let lock = NSLock()
    private var cause: Error?
    private var symptom: Error?

    public init() {}

    public var error: Error? { lock.withLock { cause ?? symptom } }

    public func set(_ error: Error, cause isCause: Bool = true) {
        lock.withLock {
            if isCause { if cause == nil { cause = error } } else if symptom == nil { symptom = error }
        }
    }

    /// Throws the failure, if any.
    public func check() throws { if let error { throw error } }
}

/// Work on dedicated threads (as many as asked: `DispatchQueue.concurrentPerform` runs at most one per core,
/// too few to keep a cold disk's reads in flight), waited for together.
public enum WorkerGroup {
    /// The number of workers for work that mixes reads from a cold disk with CPU work: enough threads that
    /// reads stay in flight while others compute (measured: cold reads of 2 MiB chunk files reach the
    /// speed of one big sequential read only at 16-32 readers).
    public static var ioDepth: Int { max(16, 4 * ProcessInfo.processInfo.activeProcessorCount) }

    /// Calls `body(worker)` on `count` threads (at least one) and returns when every call has returned.
    public static func run(_ count: Int, name: String, _ body: @escaping @Sendable (Int) -> Void) {
        let done = DispatchGroup()
        for worker in 0..<max(1, count) {
            done.enter()
            let thread = Thread {
                body(worker)
                done.leave()
            }
            thread.name = "\(name)-\(worker)"
            thread.start()
        }
        done.wait()
    }

    /// The same, for work that can fail: every worker runs to its end, then the first error thrown (by worker
    /// order of failure) is thrown. Workers that should stop early check `failure`.
    public static func run(_ count: Int, name: String, _ body: @escaping @Sendable (Int, FirstFailure) throws -> Void) throws {
        let failure = FirstFailure()
        run(count, name: name) { worker in
            do { try body(worker, failure) } catch { failure.set(error) }
        }
        try failure.check()
    }
}
