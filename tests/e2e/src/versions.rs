//! Versions of the external programs the tests build from the Go module proxy, pinned here
//! and nowhere else. The workspace's k8s-openapi feature (`v1_34`) follows KUBERNETES.

/// kube-apiserver and kubectl, and for the real cluster kubelet, kube-proxy, kube-scheduler and
/// kube-controller-manager (all built together).
pub const KUBERNETES: &str = "1.34.4";
/// etcd, the API server's store.
pub const ETCD: &str = "3.6.16";
/// Upstream wireguard-go (`golang.zx2c4.com/wireguard`), the data plane benchmark's strongest
/// userspace peer. Its tags are not semver, so this is the proxy's `@latest` pseudo-version
/// (the program calls itself v0.0.20250522).
pub const WIREGUARD_GO: &str = "0.0.0-20260522210424-ecfc5a8d5446";
/// Helm, for the chart's tests and the plain manifests rendered from it.
pub const HELM: &str = "3.19.5";
/// Debian's kernel for the kernel VM lane (`tests/e2e/src/vm`): the versioned package the
/// `linux-image-amd64` metapackage depended on when pinned, and its version (also the cache
/// directory's name). The lane says when the metapackage has moved on; Debian's security
/// archive keeps only the newest, so follow it here when the download fails.
pub const DEBIAN_KERNEL_PACKAGE: &str = "linux-image-6.1.0-57-amd64";
pub const DEBIAN_KERNEL: &str = "6.1.192-3";
