import CStasisLinux
import Foundation
import Glibc
import StasisCore
import StasisOS
import StasisTestSupport
import Testing

@Suite struct ProcAndHost {
    @Test func procStatParsesCommandsWithParentheses() {
        let me = ProcFS.stat(getpid())
        #expect(me?.pid == getpid())
        #expect(me?.ppid == getppid())
    }

    @Test func hostFactsKeepOnlyInstructionSetFlags() {
        let host = HostFacts.current()
        #expect(!host.cpuFlags.isEmpty)
        #expect(host.cpuFlags.allSatisfy(HostFacts.instructionSetFlags.contains))
    }
}

@Suite struct ListeningSockets {
    // Rows as /proc/net/tcp and tcp6 show them: 127.0.0.1:8080 and [::1]:8080 listening (state 0A), and an
    // established connection that is not a listener.
    let tcp = """
          sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
           0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0
           1: 0100007F:C350 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 4343 1 0000000000000000 20 4 30 10 -1
        """
    let tcp6 = """
          sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
           0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4444 1 0000000000000000 100 0 0 10 0
        """

    @Test func listenersOfTheProcessAreFoundInBothTables() {
        let v4 = TCPListeners.parseListening(tcp, family: AF_INET, inodes: ["4242", "4343"])
        #expect(v4.map(\.description) == ["127.0.0.1:8080"], "only the listening row")
        let v6 = TCPListeners.parseListening(tcp6, family: AF_INET6, inodes: ["4444"])
        #expect(v6.map(\.description) == ["[::1]:8080"])
        #expect(TCPListeners.parseListening(tcp, family: AF_INET, inodes: ["9999"]).isEmpty, "not this process's socket")
    }

    @Test func endpointsRoundTripThroughTheManifestsText() {
        for text in ["127.0.0.1:8080", "0.0.0.0:22", "[::]:80", "[fe80::1]:7070"] {
            #expect(TCPListeners.Endpoint(text)?.description == text)
        }
        #expect(TCPListeners.Endpoint("nonsense") == nil)
        #expect(TCPListeners.Endpoint("1.2.3.4:99999") == nil)
    }
}

/// Another process's memfd mapped here (how stasis reaches an agent's ring), tried on this process's own: the
/// same pages when the mapping is the start of a memfd of that name and at least as long as asked, else
/// nothing (the caller then copies).
@Suite struct ForeignMappings {
    @Test func onlyTheStartOfANamedMemfdLongEnoughIsMapped() throws {
        let bytes = 4 << 20
        let fd = stasis_memfd("stasis-test-ring")
        try #require(fd >= 0 && ftruncate(fd, off_t(bytes)) == 0)
        defer { close(fd) }
        let whole = try #require(mmap(nil, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0))
        defer { munmap(whole, bytes) }
        let tail = try #require(mmap(nil, bytes / 2, PROT_READ | PROT_WRITE, MAP_SHARED, fd, off_t(bytes / 2)))
        defer { munmap(tail, bytes / 2) }
        let address = { (pointer: UnsafeMutableRawPointer) in UInt64(UInt(bitPattern: pointer)) }

        let here = try #require(ForeignMapping(pid: getpid(), address: address(whole), length: bytes, memfd: "stasis-test-ring"))
        whole.storeBytes(of: 0x5eed, toByteOffset: 4096, as: UInt64.self)
        #expect(here.base.load(fromByteOffset: 4096, as: UInt64.self) == 0x5eed, "the same pages")
        here.base.storeBytes(of: 0xbeef, toByteOffset: 8192, as: UInt64.self)
        #expect(whole.load(fromByteOffset: 8192, as: UInt64.self) == 0xbeef)

        #expect(ForeignMapping(pid: getpid(), address: address(tail), length: bytes / 2, memfd: "stasis-test-ring") == nil, "not the file's start")
        #expect(ForeignMapping(pid: getpid(), address: address(whole), length: 2 * bytes, memfd: "stasis-test-ring") == nil, "longer than the file")
        #expect(ForeignMapping(pid: getpid(), address: address(whole), length: bytes, memfd: "another-name") == nil, "another memfd")
    }
}
