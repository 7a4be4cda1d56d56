import Foundation
import StasisCore
@testable import StasisEngine
import Testing

@Suite struct CheckAdvice {
    @Test func warnsAboutCRIUBefore42OnKernel616AndLater() {
        #expect(CheckOperation.knownIncompatibilities(criu: "4.1.1", kernel: "6.18.44-fc-v669").count == 1)
        #expect(CheckOperation.knownIncompatibilities(criu: "4.2.1", kernel: "6.18.44").isEmpty)
        #expect(CheckOperation.knownIncompatibilities(criu: "4.1", kernel: "6.1.0-18-amd64").isEmpty)
    }
}
