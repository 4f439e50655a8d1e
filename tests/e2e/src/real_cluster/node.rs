//! One node of a real cluster: a network namespace on the underlay (default route through the
//! underlay's router), a private mount namespace, and in them the node's own containerd (own
//! root, state and socket), kubelet (own root directory, cgroup root, CNI directory),
//! registering as a real Node, and kube-proxy.
//!
//! Dropping a node stops its kube-proxy and kubelet, kills what runs in its pods (every process in its
//! cgroups) and containerd's shims for it (found by this node's socket path in their
//! command line), stops containerd, removes its cgroups, and ends its mount and network
//! namespaces: only processes and objects this node started.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::netns::{Netns, RootLink};
use crate::process::ChildGuard;

use super::image::PAUSE_IMAGE;
use super::sweep::Ledger;

/// A node's own directories, bound over the machine's in its mount namespace: what kubelet,
/// containerd and the CNI library use whatever they are configured with (the kubelet's
/// device-plugin socket in /var/lib/kubelet/device-plugins and its log symlinks in
/// /var/log/containers, libcni's result cache in /var/lib/cni/results, containerd 1.6's shim
/// sockets in /run/containerd/s), the CNI configuration and plugins, and the host paths our
/// agent's pod mounts (its state, the userspace device's UAPI socket).
const NODE_LOCAL_PATHS: &[&str] = &[
    "/var/lib/kubelet",
    "/var/lib/cni",
    "/var/log",
    "/run/containerd",
    "/etc/cni/net.d",
    "/opt/cni/bin",
    "/var/lib/wgmesh",
    "/var/run/wireguard",
    "/run/wgmesh",
];

/// The node's paths that are in memory on a real machine (tmpfs), emptied by a reboot: /run
/// (with /var/run, a link to it) and containerd's state directory (in /run on a real node).
pub const NODE_TMPFS_PATHS: &[&str] = &["/run/containerd", "/var/run/wireguard", "/run/wgmesh"];

/// Called with a node's underlay link once it exists, before containerd and the kubelet start.
pub type LinkUp<'a> = &'a mut dyn FnMut(&str) -> Result<()>;

/// What a node needs from its cluster to start.
pub struct NodeParams<'a> {
    pub name: String,
    pub index: usize,
    pub netns: String,
    /// The node's address on the underlay, without prefix length.
    pub node_ip: String,
    /// The underlay router's address: the node's default gateway.
    pub gateway: String,
    pub bridge: String,
    pub root_link: String,
    /// The node's directory (its "disk").
    pub root: PathBuf,
    /// The node's kubeconfig contents (its client certificate, the API server's address).
    pub kubeconfig: String,
    pub ca_file: &'a Path,
    pub kubelet: &'a Path,
    pub kube_proxy: &'a Path,
    /// kube-proxy's kubeconfig (as `system:kube-proxy`).
    pub proxy_kubeconfig: String,
    pub images: &'a [PathBuf],
    /// The cgroup (in every v1 hierarchy) under which the kubelet puts its pods.
    pub cgroup_root: String,
    /// Where the node notes what it creates, for the cleanup after a killed run.
    pub ledger: &'a Ledger,
}

pub struct RealNode {
    pub name: String,
    pub index: usize,
    pub node_ip: String,
    /// The node's directory: containerd's and the kubelet's state, logs, CNI configuration.
    pub root: PathBuf,
    cgroup_root: String,
    // Drop order (after `Drop::drop`): kube-proxy, kubelet, containerd, the mount namespace's
    // holder, the network namespace, then its underlay link.
    kube_proxy: Option<ChildGuard>,
    kubelet: Option<ChildGuard>,
    containerd: Option<ChildGuard>,
    /// The process holding the node's mount namespace.
    holder: Option<ChildGuard>,
    pub ns: Netns,
    _veth: RootLink,
}

impl RealNode {
    /// Creates the namespaces and the cgroups, starts containerd, imports the images and
    /// starts the kubelet (which registers the Node; it becomes Ready once
    /// a CNI is installed: [`RealNode::install_bridge_cni`], or ours).
    /// `link_up` is called with the underlay link's name once it exists, before containerd
    /// and the kubelet start (a capture that must see the node's first packets starts there).
    pub fn start(p: NodeParams<'_>, link_up: Option<LinkUp<'_>>) -> Result<Self> {
        p.ledger.netns(&p.netns);
        p.ledger.link(&p.root_link);
        p.ledger.cgroup(&p.cgroup_root);
        let ns = Netns::create(&p.netns)?;
        let veth = crate::netns::veth_to_bridge(
            &p.bridge,
            &p.root_link,
            &ns,
            "eth0",
            &format!("{}/24", p.node_ip),
        )?;
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        ns.ip(&["route", "add", "default", "via", &p.gateway])?;
        if let Some(link_up) = link_up {
            link_up(&p.root_link)?;
        }
        for d in ["etc", "var/log/pods", "containerd", "kubelet", "kube-proxy"] {
            std::fs::create_dir_all(p.root.join(d))?;
        }
        let mut node = RealNode {
            name: p.name.clone(),
            index: p.index,
            node_ip: p.node_ip.clone(),
            root: p.root.clone(),
            cgroup_root: p.cgroup_root.clone(),
            kube_proxy: None,
            kubelet: None,
            containerd: None,
            holder: None,
            ns,
            _veth: veth,
        };
        create_cgroups(&p.cgroup_root)?;

        // The mount namespace: kubelet and containerd share it (volumes the kubelet mounts
        // must be visible to runc), and whatever they mount goes with it. The few paths they
        // use whatever their configuration says are the node's own there (bind mounts of the
        // node's directories; the mount points are created, empty, when the machine lacks them).
        let netns_path = node.ns.path();
        let mut binds: Vec<String> = Vec::new();
        for host_path in NODE_LOCAL_PATHS {
            let own = p.root.join("host").join(host_path.trim_start_matches('/'));
            std::fs::create_dir_all(&own)?;
            std::fs::create_dir_all(host_path)
                .with_context(|| format!("creating the mount point {host_path}"))?;
            binds.push(own.display().to_string());
            binds.push((*host_path).to_owned());
        }
        let mut holder = Command::new("nsenter");
        holder
            .arg(format!("--net={netns_path}"))
            .args(["unshare", "--mount", "--propagation", "private"])
            .args([
                "sh",
                "-c",
                r#"set -e; while [ $# -gt 0 ]; do mount --bind "$1" "$2"; shift 2; done; exec sleep infinity"#,
                "mount-ns",
            ])
            .args(&binds);
        let mut holder = ChildGuard::spawn("mount-ns", holder, &p.root.join("mount-ns.log"))?;
        let holder_pid = holder.pid().context("the holder has no PID")?;
        p.ledger.process(Some(holder_pid));
        let ready = wait_for_holder(&mut holder, holder_pid);
        node.holder = Some(holder);
        ready?;

        let sock = p.root.join("containerd/containerd.sock");
        let config = p.root.join("containerd/config.toml");
        std::fs::write(&config, containerd_config(&p.root, &sock))?;
        let mut containerd = node.enter(Path::new("/usr/bin/containerd"))?;
        containerd.arg(format!("--config={}", config.display()));
        let containerd =
            ChildGuard::spawn("containerd", containerd, &p.root.join("containerd.log"))?;
        p.ledger.process(containerd.pid());
        node.containerd = Some(containerd);
        node.wait_containerd(&sock)?;
        for archive in p.images {
            node.import_image(archive)?;
        }

        let kubelet_dir = p.root.join("kubelet");
        std::fs::write(kubelet_dir.join("kubeconfig"), &p.kubeconfig)?;
        std::fs::write(p.root.join("etc/resolv.conf"), "nameserver 127.0.0.1\n")?;
        let kubelet_config = kubelet_dir.join("config.yaml");
        std::fs::write(&kubelet_config, kubelet_config_yaml(&p, &sock))?;
        let mut kubelet = node.enter(p.kubelet)?;
        kubelet
            .arg(format!("--config={}", kubelet_config.display()))
            .arg(format!(
                "--kubeconfig={}",
                kubelet_dir.join("kubeconfig").display()
            ))
            .arg(format!("--hostname-override={}", p.name))
            .arg(format!("--node-ip={}", p.node_ip))
            .arg(format!("--root-dir={}", kubelet_dir.join("root").display()))
            .arg(format!("--cert-dir={}", kubelet_dir.join("pki").display()))
            .arg("--v=1");
        let kubelet = ChildGuard::spawn("kubelet", kubelet, &p.root.join("kubelet.log"))?;
        p.ledger.process(kubelet.pid());
        node.kubelet = Some(kubelet);

        // kube-proxy in iptables mode, in the node's network namespace (its rules are the
        // node's), as a DaemonSet with hostNetwork would run it.
        let proxy_dir = p.root.join("kube-proxy");
        std::fs::write(proxy_dir.join("kubeconfig"), &p.proxy_kubeconfig)?;
        let proxy_config = proxy_dir.join("config.yaml");
        std::fs::write(
            &proxy_config,
            kube_proxy_config_yaml(&p.name, &proxy_dir.join("kubeconfig")),
        )?;
        let mut kube_proxy = node.enter(p.kube_proxy)?;
        kube_proxy
            .arg(format!("--config={}", proxy_config.display()))
            .arg("--v=1");
        let kube_proxy =
            ChildGuard::spawn("kube-proxy", kube_proxy, &p.root.join("kube-proxy.log"))?;
        p.ledger.process(kube_proxy.pid());
        node.kube_proxy = Some(kube_proxy);
        Ok(node)
    }

    /// A command running `program` in the node's network and mount namespaces (nsenter).
    fn enter(&self, program: &Path) -> Result<Command> {
        let holder = self
            .holder
            .as_ref()
            .and_then(ChildGuard::pid)
            .context("the node's mount namespace is gone")?;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.ns.path()))
            .arg(format!("--mount=/proc/{holder}/ns/mnt"))
            .arg(program);
        Ok(cmd)
    }

    /// Runs `program` on the node: in its network and mount namespaces, where its processes
    /// (and `docker exec` on a kind node) see its files, such as the userspace device's
    /// socket for `wg`.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        let out = self.enter(Path::new(program))?.args(args).output()?;
        if !out.status.success() {
            bail!(
                "{}: {program} {}: {}",
                self.name,
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `ctr` against the node's containerd, in its `k8s.io` namespace (the CRI's).
    fn ctr(&self, args: &[&str]) -> Result<String> {
        let address = format!(
            "--address={}",
            self.root.join("containerd/containerd.sock").display()
        );
        let mut full = vec![address.as_str(), "-n", "k8s.io"];
        full.extend_from_slice(args);
        self.exec("/usr/bin/ctr", &full)
    }

    /// Imports an OCI archive into the node's containerd, as `kind load` would.
    pub fn import_image(&self, archive: &Path) -> Result<()> {
        let archive = archive.to_str().context("a non-UTF-8 path")?;
        self.ctr(&["images", "import", archive])?;
        Ok(())
    }

    /// Removes an image's name from the node, as the kubelet's image garbage collection
    /// would (the content stays while another name refers to it).
    pub fn remove_image(&self, name: &str) -> Result<()> {
        self.ctr(&["images", "rm", name])?;
        Ok(())
    }

    /// Gives an imported image a second name, as `docker tag` would.
    pub fn tag_image(&self, image: &str, name: &str) -> Result<()> {
        self.ctr(&["images", "tag", "--force", image, name])?;
        Ok(())
    }

    /// The PID of a running container's first process, from its ID as the Pod's status
    /// gives it (`containerd://<id>` or the bare ID).
    pub fn container_pid(&self, container_id: &str) -> Result<u32> {
        let id = container_id.trim_start_matches("containerd://");
        // `ctr task ls`: TASK PID STATUS, one line per task after a header.
        self.ctr(&["task", "ls"])?
            .lines()
            .find_map(|l| {
                let mut f = l.split_whitespace();
                (f.next()? == id).then(|| f.next()?.parse().ok())?
            })
            .with_context(|| format!("{}: no running task {id}", self.name))
    }

    fn wait_containerd(&mut self, sock: &Path) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let c = self.containerd.as_mut().context("no containerd")?;
            if !c.is_running() {
                bail!(
                    "{}: containerd exited; its log ends with:\n{}",
                    self.name,
                    c.log_tail(30)
                );
            }
            if sock.exists() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("{}: containerd did not open {}", self.name, sock.display())
    }

    /// Empties what a reboot of a machine empties on this node's disk: [`NODE_TMPFS_PATHS`]
    /// and containerd's state. Only for a node that is shut down (dropped).
    pub fn forget_memory(root: &Path) -> Result<()> {
        let own = |p: &str| root.join("host").join(p.trim_start_matches('/'));
        let dirs = NODE_TMPFS_PATHS
            .iter()
            .map(|p| own(p))
            .chain([root.join("containerd/state")]);
        for dir in dirs {
            match std::fs::remove_dir_all(&dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e).with_context(|| format!("emptying {}", dir.display()));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Where the node's `path` (as its processes see it) is on this machine.
    pub fn host_path(&self, path: &str) -> PathBuf {
        self.root.join("host").join(path.trim_start_matches('/'))
    }

    /// Installs a plain pod network on the node, as another CNI would: Debian's bridge and
    /// host-local plugins in /opt/cni/bin and a configuration over the node's pod CIDR.
    /// containerd then reports the network ready, and the kubelet the Node.
    pub fn install_bridge_cni(&self, pod_cidr: &str) -> Result<()> {
        let bin = self.host_path("/opt/cni/bin");
        for plugin in ["bridge", "host-local", "loopback", "portmap"] {
            let link = bin.join(plugin);
            if !link.exists() {
                std::os::unix::fs::symlink(Path::new("/usr/lib/cni").join(plugin), link)?;
            }
        }
        let conf = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "wgmesh-test-bridge",
            "plugins": [{
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": pod_cidr}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            }],
        });
        let dir = self.host_path("/etc/cni/net.d");
        let tmp = dir.join(".10-bridge.conflist.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&conf)?)?;
        std::fs::rename(&tmp, dir.join("10-bridge.conflist"))?;
        Ok(())
    }

    /// Whether the kubelet and containerd still run; the end of the log of one that stopped.
    pub fn check_running(&mut self) -> Result<()> {
        for guard in [
            self.kube_proxy.as_mut(),
            self.kubelet.as_mut(),
            self.containerd.as_mut(),
        ]
        .into_iter()
        .flatten()
        {
            if !guard.is_running() {
                bail!(
                    "{}: {} exited; its log ends with:\n{}",
                    self.name,
                    guard.name().to_owned(),
                    guard.log_tail(40)
                );
            }
        }
        Ok(())
    }

    pub fn kubelet_log_tail(&self, lines: usize) -> String {
        self.kubelet
            .as_ref()
            .map(|k| k.log_tail(lines))
            .unwrap_or_default()
    }

    pub fn kube_proxy_log_tail(&self, lines: usize) -> String {
        self.kube_proxy
            .as_ref()
            .map(|k| k.log_tail(lines))
            .unwrap_or_default()
    }

    pub fn containerd_log_tail(&self, lines: usize) -> String {
        self.containerd
            .as_ref()
            .map(|k| k.log_tail(lines))
            .unwrap_or_default()
    }

    /// PIDs of the node's processes: kubelet, containerd, shims, and everything in its pods.
    pub fn pids(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = [&self.kube_proxy, &self.kubelet, &self.containerd]
            .into_iter()
            .flatten()
            .filter_map(ChildGuard::pid)
            .collect();
        pids.extend(self.shim_pids());
        pids.extend(cgroup_pids(&self.cgroup_root));
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// containerd's shims for this node: their command line names this node's socket.
    fn shim_pids(&self) -> Vec<u32> {
        let sock = self.root.join("containerd/containerd.sock");
        let needle = sock.to_string_lossy().into_owned();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                    let c = String::from_utf8_lossy(&c);
                    c.starts_with("/usr/bin/containerd-shim") && c.contains(&needle)
                })
            })
            .collect()
    }
}

impl Drop for RealNode {
    fn drop(&mut self) {
        if let Some(mut kube_proxy) = self.kube_proxy.take() {
            kube_proxy.stop(Duration::from_secs(5));
        }
        if let Some(mut kubelet) = self.kubelet.take() {
            kubelet.stop(Duration::from_secs(5));
        }
        // The pods' processes, then the shims, which would otherwise outlive containerd.
        for _ in 0..3 {
            let pids = cgroup_pids(&self.cgroup_root);
            if pids.is_empty() {
                break;
            }
            for pid in pids {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        for pid in self.shim_pids() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        if let Some(mut containerd) = self.containerd.take() {
            containerd.stop(Duration::from_secs(5));
        }
        remove_cgroups(&self.cgroup_root);
        if let Some(mut holder) = self.holder.take() {
            holder.kill();
        }
    }
}

/// Waits until the holder has made its bind mounts in a mount namespace of its own (it then
/// becomes `sleep`).
fn wait_for_holder(holder: &mut ChildGuard, pid: u32) -> Result<()> {
    let ours = std::fs::read_link("/proc/self/ns/mnt")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if !holder.is_running() {
            bail!(
                "the mount namespace's holder exited: {}",
                holder.log_tail(10)
            );
        }
        let own_ns = std::fs::read_link(format!("/proc/{pid}/ns/mnt")).is_ok_and(|t| t != ours);
        let sleeping =
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "sleep");
        if own_ns && sleeping {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    bail!("process {pid} did not set up its mount namespace")
}

/// The cgroup v1 hierarchies mounted under /sys/fs/cgroup (cgroup v2 has one, the root).
fn hierarchies() -> Vec<PathBuf> {
    let base = Path::new("/sys/fs/cgroup");
    if base.join("cgroup.controllers").exists() {
        return vec![base.to_owned()];
    }
    let Ok(entries) = std::fs::read_dir(base) else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("cgroup.procs").exists() && !p.is_symlink())
        .collect()
}

/// Creates the kubelet's cgroup root in every hierarchy (the kubelet refuses to start without
/// it); cpuset's must be given CPUs and memory nodes before anything can join it.
fn create_cgroups(root: &str) -> Result<()> {
    for h in hierarchies() {
        let dir = h.join(root.trim_start_matches('/'));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        if h.ends_with("cpuset") {
            for file in ["cpuset.cpus", "cpuset.mems"] {
                let value = std::fs::read_to_string(h.join(file))?;
                std::fs::write(dir.join(file), value.trim())
                    .with_context(|| format!("writing {}", dir.join(file).display()))?;
            }
        }
    }
    Ok(())
}

/// Every process in the cgroup root's subtree (any hierarchy: they hold the same processes).
pub(super) fn cgroup_pids(root: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for h in hierarchies() {
        let dir = h.join(root.trim_start_matches('/'));
        collect_procs(&dir, &mut pids);
    }
    pids.sort_unstable();
    pids.dedup();
    pids
}

fn collect_procs(dir: &Path, pids: &mut Vec<u32>) {
    if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        pids.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                collect_procs(&e.path(), pids);
            }
        }
    }
}

/// Removes the cgroup root's subtree, deepest first (cgroups are removed with rmdir).
pub(super) fn remove_cgroups(root: &str) {
    fn remove(dir: &Path) {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    remove(&e.path());
                }
            }
        }
        let _ = std::fs::remove_dir(dir);
    }
    for h in hierarchies() {
        remove(&h.join(root.trim_start_matches('/')));
    }
}

/// containerd 1.6's configuration: everything under the node's directory (runc's state too,
/// which otherwise goes to /run/containerd/runc), the CRI plugin with our pause image, runc
/// with cgroupfs, and the CNI's standard directories.
fn containerd_config(root: &Path, sock: &Path) -> String {
    let c = root.join("containerd");
    format!(
        r#"version = 2
root = "{root}"
state = "{state}"

[grpc]
  address = "{sock}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  netns_mounts_under_state_dir = true
  # The build machines withhold CAP_SYS_RESOURCE even from root, so no process may lower its
  # oom_score_adj, which runc does for every sandbox (-998) and fails with "Permission
  # denied". This clamps the values to containerd's own, as for rootless containerd.
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{runc}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    # The node's own (NODE_LOCAL_PATHS), where a CNI's installer puts them.
    bin_dir = "/opt/cni/bin"
    conf_dir = "/etc/cni/net.d"
"#,
        root = c.join("root").display(),
        state = c.join("state").display(),
        sock = sock.display(),
        opt = c.join("opt").display(),
        runc = c.join("runc").display(),
    )
}

fn kubelet_config_yaml(p: &NodeParams<'_>, sock: &Path) -> String {
    format!(
        r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# This machine's cgroups are v1; kubelet 1.35 refuses them unless told.
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: {cgroup_root}
containerRuntimeEndpoint: unix://{sock}
address: {node_ip}
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: false
  x509:
    clientCAFile: {ca}
authorization:
  mode: AlwaysAllow
clusterDomain: cluster.local
clusterDNS: [10.96.0.10]
resolvConf: {resolv}
podLogsDir: {logs}
failSwapOn: false
# Several kubelets share one disk: no evictions or image collection because of it.
evictionHard:
  memory.available: "50Mi"
  nodefs.available: "1%"
  nodefs.inodesFree: "1%"
  imagefs.available: "1%"
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
nodeStatusReportFrequency: 10s
"#,
        cgroup_root = p.cgroup_root,
        sock = sock.display(),
        node_ip = p.node_ip,
        ca = p.ca_file.display(),
        resolv = p.root.join("etc/resolv.conf").display(),
        logs = p.root.join("var/log/pods").display(),
    )
}

/// kube-proxy's configuration: iptables mode, and no conntrack settings, some of which are
/// the machine's (`nf_conntrack_max`) rather than the namespace's.
fn kube_proxy_config_yaml(name: &str, kubeconfig: &Path) -> String {
    format!(
        r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: {kubeconfig}
hostnameOverride: {name}
mode: iptables
clusterCIDR: {cluster_cidr}
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
  udpTimeout: 0s
  udpStreamTimeout: 0s
"#,
        kubeconfig = kubeconfig.display(),
        cluster_cidr = super::CLUSTER_CIDR,
    )
}
