#!/usr/bin/env python3
"""Packs a directory into a one-layer OCI image archive that `ctr images import` loads.

usage: mkimage.py ROOTFS OUT.tar NAME:TAG [--entrypoint JSON] [--cmd JSON] [--user UID:GID]
                  [--expose PORT/tcp ...] [--gzip-level N]

The archive is an OCI image layout (oci-layout, index.json, blobs) that also carries a Docker
manifest.json, so `docker load` and `podman load` take it too. Every file is owned by root with
mtime 0, so the same directory always gives the same image digest.
"""
import argparse
import gzip
import hashlib
import io
import json
import os
import tarfile

CREATED = "2026-01-01T00:00:00Z"


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer(root: str) -> bytes:
    """The directory as an uncompressed tar, entries sorted, owners and times cleared."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(walk(root)):
            info = tar.gettarinfo(os.path.join(root, path), arcname=path)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0
            if info.isfile():
                with open(os.path.join(root, path), "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    return out.getvalue()


def walk(root: str):
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            yield os.path.relpath(os.path.join(directory, name), root)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rootfs")
    parser.add_argument("out")
    parser.add_argument("ref", help="the image name the archive carries, NAME:TAG")
    parser.add_argument("--entrypoint", default="null")
    parser.add_argument("--cmd", default="null")
    parser.add_argument("--user", default="")
    parser.add_argument("--expose", action="append", default=[])
    parser.add_argument("--gzip-level", type=int, default=1)
    args = parser.parse_args()

    diff = layer(args.rootfs)
    blob = gzip.compress(diff, compresslevel=args.gzip_level, mtime=0)
    image_config = {
        "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"],
        "Entrypoint": json.loads(args.entrypoint),
        "Cmd": json.loads(args.cmd),
        "WorkingDir": "/",
    }
    if args.user:
        image_config["User"] = args.user
    if args.expose:
        image_config["ExposedPorts"] = {port: {} for port in args.expose}
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "created": CREATED,
            "config": image_config,
            "rootfs": {"type": "layers", "diff_ids": [digest(diff)]},
            "history": [{"created": CREATED, "created_by": "tests/harness/mkimage.py"}],
        },
        sort_keys=True,
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": digest(config),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": digest(blob),
                    "size": len(blob),
                }
            ],
        },
        sort_keys=True,
    ).encode()
    tag = args.ref.rsplit(":", 1)[1]
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": digest(manifest),
                    "size": len(manifest),
                    "platform": {"architecture": "amd64", "os": "linux"},
                    "annotations": {
                        "io.containerd.image.name": args.ref,
                        "org.opencontainers.image.ref.name": tag,
                    },
                }
            ],
        }
    ).encode()
    docker = json.dumps(
        [
            {
                "Config": "blobs/sha256/" + digest(config)[7:],
                "RepoTags": [args.ref],
                "Layers": ["blobs/sha256/" + digest(blob)[7:]],
            }
        ]
    ).encode()

    with tarfile.open(args.out, "w") as tar:

        def put(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))

        put("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        for data in (config, manifest, blob):
            put("blobs/sha256/" + digest(data)[7:], data)
        put("index.json", index)
        put("manifest.json", docker)
    print(f"{args.out}: {args.ref} ({len(blob)} bytes compressed)")


if __name__ == "__main__":
    main()
