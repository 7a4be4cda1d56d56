import Foundation
import Testing

/// docs/ARCHITECTURE.md is what a newcomer reads first, so it is checked against the code it describes: the
/// module table against Package.swift's targets, and every path it points to against the tree.
@Suite struct ArchitectureDocument {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().path

    @Test func theModuleTableMatchesPackageSwift() throws {
        let targets = try PackageTargets(manifest: String(contentsOfFile: Self.root + "/Package.swift", encoding: .utf8))
        let table = try ModuleTable(document: String(contentsOfFile: Self.root + "/docs/ARCHITECTURE.md", encoding: .utf8))

        #expect(!table.rows.isEmpty, "no module table found under \"## Modules\"")
        for module in targets.modules where table.rows[module] == nil {
            Issue.record("docs/ARCHITECTURE.md has no row for the module \(module)")
        }
        for (module, listed) in table.rows {
            guard let declared = targets.dependencies[module] else {
                Issue.record("docs/ARCHITECTURE.md lists \(module), which Package.swift does not declare")
                continue
            }
            // Only the package's own targets are compared: products of other packages are named in prose.
            let own = declared.filter { targets.dependencies[$0] != nil }
            #expect(listed == own, "\(module): the table says \(listed.sorted()), Package.swift says \(own.sorted())")
        }
    }

    @Test func everyPathItNamesExists() throws {
        let document = try String(contentsOfFile: Self.root + "/docs/ARCHITECTURE.md", encoding: .utf8)
        for path in Self.namedPaths(in: document) {
            let candidates = [path, "Sources/" + path].map { Self.root + "/" + $0 }
            #expect(candidates.contains { FileManager.default.fileExists(atPath: $0) },
                    "docs/ARCHITECTURE.md names \(path), which is not in the tree")
        }
    }

    /// The repository paths the document names: backticked ones that start with a module or a top-level folder
    /// (`STORE/writers/` is a place in a store, not in the tree), and the first word of each line of its file map.
    static func namedPaths(in document: String) -> [String] {
        let topLevel = ["Sources", "Tests", "scripts", "docs", "bench", "Workloads"]
        let backticked = ModuleTable.backticked(in: document).filter { path in
            guard path.contains("/"), !path.contains(" "), let first = path.split(separator: "/").first else { return false }
            return first.hasPrefix("Stasis") || first.hasPrefix("CStasis") || topLevel.contains(String(first))
        }
        var mapped: [String] = []
        if let map = document.range(of: "## Files"), let open = document[map.upperBound...].range(of: "```\n") {
            let block = document[open.upperBound...]
            let body = block[..<(block.range(of: "```")?.lowerBound ?? block.endIndex)]
            for line in body.split(separator: "\n") where !line.hasPrefix(" ") {
                guard let word = line.split(separator: " ").first, !word.contains("*") else { continue }
                mapped.append(String(word))
            }
        }
        return backticked + mapped
    }
}

/// The targets Package.swift declares, read from its text: a `.target`, `.executableTarget` or `.testTarget`
/// call's name, its `dependencies: [...]`'s plain names (a `.product(name:package:)` is another package's), and
/// whether it lives in its default place (Sources/NAME), which is what makes it one of the package's modules.
struct PackageTargets {
    var dependencies: [String: Set<String>] = [:]
    /// Library and executable targets under Sources/, other than C shims (CStasis*), which their users' rows name.
    var modules: Set<String> = []

    init(manifest: String) throws {
        let declaration = try Regex(#"\.(target|executableTarget|testTarget)\(name:\s*"([^"]+)""#)
        let starts = manifest.matches(of: declaration)
        for (index, match) in starts.enumerated() {
            let end = index + 1 < starts.count ? starts[index + 1].range.lowerBound : manifest.endIndex
            let body = manifest[match.range.upperBound..<end]
            let kind = String(match.output[1].substring ?? "")
            let name = String(match.output[2].substring ?? "")
            dependencies[name] = Self.plainDependencies(in: body)
            if kind != "testTarget" && !body.contains("path:") && !name.hasPrefix("C") { modules.insert(name) }
        }
    }

    private static func plainDependencies(in body: Substring) -> Set<String> {
        guard let open = body.range(of: "dependencies: [") else { return [] }
        var depth = 1
        var position = open.upperBound
        while position < body.endIndex && depth > 0 {
            if body[position] == "[" { depth += 1 } else if body[position] == "]" { depth -= 1 }
            position = body.index(after: position)
        }
        let list = body[open.upperBound..<position]
        // A plain dependency is a quoted name right after `[`, `,` or a newline; `name: "..."` and
        // `package: "..."` belong to products.
        let plain = try! Regex(#"(?:^|[\[,\s])"([A-Za-z0-9_-]+)""#)
        return Set(list.matches(of: plain).compactMap { match -> String? in
            let before = list[list.startIndex..<match.range.lowerBound].suffix(8)
            if before.hasSuffix("name:") || before.hasSuffix("package:") { return nil }
            return match.output[1].substring.map(String.init)
        })
    }
}

/// The table under "## Modules": the first column's module, the second column's backticked names.
struct ModuleTable {
    var rows: [String: Set<String>] = [:]

    init(document: String) throws {
        guard let section = document.range(of: "## Modules") else { return }
        let after = document[section.upperBound...]
        let end = after.range(of: "\n## ")?.lowerBound ?? after.endIndex
        for line in after[..<end].split(separator: "\n") where line.hasPrefix("| `") {
            let columns = line.split(separator: "|", omittingEmptySubsequences: false).map(String.init)
            guard columns.count >= 4, let module = Self.backticked(in: columns[1]).first else { continue }
            rows[module] = Set(Self.backticked(in: columns[2]))
        }
    }

    static func backticked(in text: String) -> [String] {
        text.split(separator: "`", omittingEmptySubsequences: false).enumerated()
            .filter { $0.offset % 2 == 1 }.map { String($0.element) }
    }
}
