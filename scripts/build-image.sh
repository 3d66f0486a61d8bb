#!/usr/bin/env bash
# Builds the container image of stevedore itself, `stevedore/stevedore:<version>` (also tagged
# `latest`), with no registry: the root filesystem is put together from the release binary,
# the shared libraries it links against and a static busybox (for a shell and health checks),
# then handed to `docker import`. The same image serves (`serve`) and runs tasks remotely
# (`runner`, beside a Docker engine whose socket is mounted in).
#
#   scripts/build-image.sh                   # cargo build --release, then the image
#   scripts/build-image.sh --binary PATH     # an already built binary (the tests use this)
#   scripts/build-image.sh --name REPO       # REPO:<version> and REPO:latest instead
set -euo pipefail
cd "$(dirname "$0")/.."

binary=""
name=stevedore/stevedore
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary="$2"; shift 2 ;;
    --name) name="$2"; shift 2 ;;
    *) echo "build-image: unknown argument $1" >&2; exit 2 ;;
  esac
done

if [ -x scripts/ensure-docker.sh ]; then
  scripts/ensure-docker.sh
fi
if [ -z "$binary" ]; then
  cargo build --release --locked --bin stevedore
  binary=target/release/stevedore
fi
busybox=/bin/busybox
if ! "$busybox" --help >/dev/null 2>&1 || ldd "$busybox" >/dev/null 2>&1; then
  echo "build-image: $busybox must be a static busybox (apt-get install busybox-static)" >&2
  exit 1
fi

version=$("$binary" --version | awk '{print $2}')
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,etc,tmp,usr/bin,var/lib/stevedore}
chmod 1777 "$root/tmp"
cp "$binary" "$root/usr/bin/stevedore"
# Every shared library the binary needs, at the path its loader looks in.
ldd "$binary" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' | sort -u |
  while read -r lib; do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
cp "$busybox" "$root/bin/busybox"
for tool in sh ls cat wget ps kill sleep env; do
  ln -s busybox "$root/bin/$tool"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"

image="$name:$version"
tar -C "$root" --numeric-owner --owner=0 --group=0 -c . |
  docker import \
    --change 'ENTRYPOINT ["/usr/bin/stevedore"]' \
    --change 'CMD ["serve", "--listen", "0.0.0.0:8080"]' \
    --change 'ENV STEVEDORE_DATA_DIR=/var/lib/stevedore PATH=/usr/bin:/bin' \
    --change 'WORKDIR /var/lib/stevedore' \
    --change 'EXPOSE 8080' \
    --change "LABEL org.opencontainers.image.title=stevedore org.opencontainers.image.version=$version" \
    - "$image" >/dev/null
docker tag "$image" "$name:latest"
echo "$image"
