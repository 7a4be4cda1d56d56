import Foundation
import StasisCore
import StasisOS

/// What podman knows of a container that it made and that stasis checkpoints through runc. `podman container
/// restore --import` makes a new container from an archive's config.dump, and needs at least the image its
/// root filesystem came from; podman keeps that in its database, but containers/storage, which podman
/// uses, also lists it in a plain JSON file beside the container's bundle:
///
///     GRAPHROOT/overlay-containers/ID/userdata        the bundle runc ran (its config.json)
///     GRAPHROOT/overlay-containers/containers.json    [{id, names, image, metadata: "{image-name, image-id, name}"}]
///
/// (overlay is the storage driver; another driver names its folder after itself.)
public enum Podman {
    /// podman's annotation on every spec it writes: io.container.manager = libpod.
    public static let manager = "libpod"

    /// The engine's view of container `id` whose bundle is `bundle`, when podman made it and
    /// containers/storage lists it; nil for any other container (plain runc, CRI-O, containerd).
    /// Every failure below means "not podman's, as far as stasis can tell": the record is optional, and the
    /// checkpoint is restored through runc without it.
    public static func engine(of id: String, bundle: String, spec: Data) -> Manifest.Container.Engine? {
        // A spec that is not JSON names no engine (runc's own checkpoint reports a broken spec).
        guard let object = try? JSONSerialization.jsonObject(with: spec) as? [String: Any],
              (object["annotations"] as? [String: String])?["io.container.manager"] == manager else { return nil }
        let containers = URL(fileURLWithPath: bundle).deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("containers.json").path
        // No containers.json, or one stasis cannot read: not a podman container (above).
        guard let data = try? FileSystem.readFile(containers),
              let list = try? JSONSerialization.jsonObject(with: data) as? [[String: Any]],  // not listed: not podman's (above)
              let entry = list.first(where: { $0["id"] as? String == id }),
              // Metadata that is not JSON: no engine record (above).
              let metadata = (entry["metadata"] as? String).flatMap({ try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] }),
              let imageID = metadata["image-id"] as? String ?? entry["image"] as? String,
              let imageName = metadata["image-name"] as? String else { return nil }
        let name = metadata["name"] as? String ?? (entry["names"] as? [String])?.first ?? id
        return Manifest.Container.Engine(name: manager, containerName: name, imageID: imageID, imageName: imageName)
    }

    /// The config.dump podman reads back: its ContainerConfig's keys that a restore needs (podman fills the
    /// rest with defaults): the container, its image, its runtime and its spec.
    public static func configDump(engine: Manifest.Container.Engine, id: String, runtime: String, created: String, spec: Data) throws -> Data {
        let specObject = try JSONSerialization.jsonObject(with: spec)
        let config: [String: Any] = [
            "id": id, "name": engine.containerName, "runtime": runtime, "createdTime": created,
            "rootfsImageID": engine.imageID, "rootfsImageName": engine.imageName, "RawImageName": engine.imageName,
            "spec": specObject,
        ]
        return try JSONSerialization.data(withJSONObject: config, options: [.sortedKeys])
    }
}
