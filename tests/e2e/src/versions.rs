//! Versions of the external programs the tests build from the Go module proxy, pinned here
//! and nowhere else. The workspace's k8s-openapi feature (`v1_34`) follows KUBERNETES.

/// kube-apiserver and kubectl.
pub const KUBERNETES: &str = "1.34.4";
/// etcd, the API server's store.
pub const ETCD: &str = "3.6.16";
