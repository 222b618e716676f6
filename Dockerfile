# The modelcache node daemon (and CLI) image.
#
#   docker build -t registry.example.com/modelcache:0.1.0 .
#
# One stage: every dependency ships manylinux wheels for CPython 3.11, so no
# compiler is needed and nothing is left to strip. The CSI gRPC stubs are
# committed under modelcache/csi/ and installed with the package.
#
# Checked without a Docker engine by tools/check_image.py, which reads this
# file: it builds the same root filesystem with debootstrap (Debian bookworm,
# which this base is), runs the RUN lines below in a chroot, then runs the
# entry point as the USER below (README: "How the image is checked"). Keep to
# the instructions it understands: FROM, ARG, ENV, WORKDIR, COPY (from the
# build context), RUN, USER, EXPOSE, LABEL, ENTRYPOINT, CMD.
FROM python:3.11-slim-bookworm

LABEL org.opencontainers.image.title="modelcache" \
      org.opencontainers.image.description="Node-local model cache, CSI driver and OCI packager"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/modelcache \
    PATH=/opt/modelcache/bin:$PATH

# A venv keeps the package and its dependencies apart from the base's own Python packages.
RUN python3 -m venv /opt/modelcache

# Only what the build needs: .dockerignore admits pyproject.toml, README.md and modelcache/.
COPY pyproject.toml README.md /src/
COPY modelcache /src/modelcache
RUN pip install /src && rm -rf /src

# A user for what does not need root: the CLI (pull, package, ls) run from this image.
# The DaemonSet overrides it with runAsUser: 0, because the CSI node plugin calls
# mount(2) for bind mounts into kubelet's pod directories with Bidirectional mount
# propagation, which needs a privileged container running as root (daemonset.yaml).
RUN groupadd --system --gid 65532 modelcache \
 && useradd --system --uid 65532 --gid 65532 --home-dir /var/lib/modelcache --no-create-home \
            --shell /usr/sbin/nologin modelcache \
 && mkdir -p /var/lib/modelcache \
 && chown 65532:65532 /var/lib/modelcache
USER 65532:65532
WORKDIR /var/lib/modelcache
ENV MODELCACHE_STORE=/var/lib/modelcache

EXPOSE 8470
ENTRYPOINT ["modelcache"]
CMD ["serve"]
