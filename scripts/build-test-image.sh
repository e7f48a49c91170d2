#!/usr/bin/env bash
# Builds Berth's test image: a one-layer OCI image archive (oci-layout + index.json + blobs)
# holding a busybox-static rootfs. No network: everything comes from the local busybox binary.
#
#   scripts/build-test-image.sh OUT.tar [REF]
#
# REF defaults to docker.io/library/busybox:local and is written as the image's ref name.
set -euo pipefail

out=${1:?usage: build-test-image.sh OUT.tar [REF]}
ref=${2:-docker.io/library/busybox:local}
busybox=$(command -v busybox || true)
if [ -z "$busybox" ] || ! file -L "$busybox" 2>/dev/null | grep -q 'statically linked'; then
  [ -x /bin/busybox ] && busybox=/bin/busybox
fi
[ -x "$busybox" ] || { echo "busybox-static is required (apt-get install busybox-static)" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/rootfs
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,tmp,proc,sys,dev,root,var}
chmod 1777 "$root/tmp"
cp "$busybox" "$root/bin/busybox"
for applet in $("$busybox" --list); do
  [ "$applet" = busybox ] && continue
  ln -sf busybox "$root/bin/$applet"
done
echo 'root:x:0:0:root:/root:/bin/sh' > "$root/etc/passwd"
echo 'root:x:0:' > "$root/etc/group"

# Fixed mtimes and owners so that the same busybox gives the same digests.
layer=$work/layer.tar
tar --sort=name --mtime='2020-01-01 00:00:00Z' --owner=0 --group=0 --numeric-owner \
  -C "$root" -cf "$layer" .

blobs=$work/oci/blobs/sha256
mkdir -p "$blobs"
sha() { sha256sum "$1" | cut -d' ' -f1; }
layer_digest=$(sha "$layer")
layer_size=$(stat -c %s "$layer")
cp "$layer" "$blobs/$layer_digest"

arch=$(dpkg --print-architecture 2>/dev/null || echo amd64)
config=$work/config.json
printf '{"architecture":"%s","os":"linux","config":{"Env":["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["sh"],"WorkingDir":"/"},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]},"history":[{"created":"2020-01-01T00:00:00Z","created_by":"berth build-test-image.sh"}]}' \
  "$arch" "$layer_digest" > "$config"
config_digest=$(sha "$config")
config_size=$(stat -c %s "$config")
cp "$config" "$blobs/$config_digest"

manifest=$work/manifest.json
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%s}]}' \
  "$config_digest" "$config_size" "$layer_digest" "$layer_size" > "$manifest"
manifest_digest=$(sha "$manifest")
manifest_size=$(stat -c %s "$manifest")
cp "$manifest" "$blobs/$manifest_digest"

printf '{"imageLayoutVersion":"1.0.0"}' > "$work/oci/oci-layout"
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"io.containerd.image.name":"%s","org.opencontainers.image.ref.name":"%s"}}]}' \
  "$manifest_digest" "$manifest_size" "$ref" "$ref" > "$work/oci/index.json"

mkdir -p "$(dirname "$out")"
tar --sort=name --mtime='2020-01-01 00:00:00Z' --owner=0 --group=0 --numeric-owner \
  -C "$work/oci" -cf "$out" oci-layout index.json blobs
echo "$out: $ref (manifest sha256:$manifest_digest, $(du -h "$out" | cut -f1))"
