import CStasisLinux
import Glibc

/// SIGINT, SIGTERM and SIGHUP for an operation with a point of no return (a migration's commit): before it,
/// a signal abandons the operation where it stands (its connection is shut down, so every wait on it ends
/// and the operation undoes what it did); from it until the outcome is settled, a signal is only recorded,
/// and the operation says so once it is done. Outside an operation (after `install`, before `abortable`, or
/// after `idle`) a signal ends stasis at once, as it would without this.
public enum Interruption {
    /// Catches the three signals from now on.
    public static func install() {
        _ = stasis_interruption_install()
    }

    /// A signal now shuts `connection` down and is recorded.
    public static func abortable(_ connection: TCPConnection) {
        stasis_interruption_arm(connection.fd.rawValue)
    }

    /// From now on a signal is only recorded. Returns the signal that came before (nil: none): the caller
    /// must then abandon the operation, its connection may already be shut down.
    public static func deferSignals() -> Int32? {
        let caught = stasis_interruption_defer()
        return caught == 0 ? nil : caught
    }

    /// Back to the default: a signal ends stasis at once.
    public static func idle() { stasis_interruption_idle() }

    /// The first signal caught since `install`, if any.
    public static var caught: Int32? {
        let caught = stasis_interruption_caught()
        return caught == 0 ? nil : caught
    }

    /// "SIGTERM", for messages.
    public static func name(_ signal: Int32) -> String {
        switch signal {
        case SIGINT: "SIGINT"
        case SIGTERM: "SIGTERM"
        case SIGHUP: "SIGHUP"
        default: "signal \(signal)"
        }
    }
}
