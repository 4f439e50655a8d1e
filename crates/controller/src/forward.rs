//! Forwarding agents' status reports to the lease holder. Every replica serves agents, but only
//! the lease holder writes status, so a replica that is not the holder passes each report on
//! to it over mutual TLS (the replicas share the serving certificate and its CA).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::{Request, Status};
use wgmesh_proto as pb;
use wgmesh_proto::mesh_service_client::MeshServiceClient;

use crate::liveness::StreamEvent;

/// Metadata key marking a report forwarded by another replica.
pub const FORWARDED: &str = "x-wgmesh-forwarded";
/// Metadata key of a forwarded report that only says an agent's peer stream to the sending
/// replica `opened` or `closed` (gateway failover: [`crate::liveness`]).
pub const STREAM_EVENT: &str = "x-wgmesh-stream";
/// Metadata of a forwarded stream event: how many streams the agent has open on the sending
/// replica now, and the sending replica's lease identity. The holder keeps the latest count
/// of each replica, so events told twice or lost on the way are made good by the next.
pub const STREAM_COUNT: &str = "x-wgmesh-stream-count";
pub const STREAM_ORIGIN: &str = "x-wgmesh-stream-origin";
/// How long the lease holder's address is trusted before reading the Lease again.
const HOLDER_TTL: Duration = Duration::from_secs(5);

/// While this replica does not hold the lease, tells each new holder which agents have
/// their peer stream here, and tells it again every
/// [`crate::liveness::REMOTE_COUNT_REFRESH`]: the holder judges gateways down from streams
/// closing (one it never heard of opening would count as down once
/// [`crate::liveness::UNSEEN`] passed), and stops believing counts not told again (a
/// replica that died cannot say its streams closed).
pub async fn announce_streams_to_new_holders(
    forwarder: std::sync::Arc<Forwarder>,
    reports: std::sync::Arc<crate::reports::Reports>,
    leader: tokio::sync::watch::Receiver<bool>,
) {
    let mut announced_to: Option<(String, Instant)> = None;
    let mut tick = tokio::time::interval(HOLDER_TTL);
    loop {
        tick.tick().await;
        if *leader.borrow() {
            announced_to = None;
            continue;
        }
        let Ok(holder) = forwarder.holder().await else {
            continue;
        };
        if announced_to.as_ref().is_some_and(|(to, at)| {
            *to == holder && at.elapsed() < crate::liveness::REMOTE_COUNT_REFRESH
        }) {
            continue;
        }
        let started = Instant::now();
        let mut all_sent = true;
        for (mesh, node) in reports.liveness.open_here() {
            let open = reports.liveness.local_streams(&mesh, &node);
            if let Err(e) = forwarder
                .forward_stream_count(&mesh, &node, StreamEvent::Opened, open)
                .await
            {
                tracing::warn!(error = %e, "announcing open streams to the lease holder failed");
                all_sent = false;
                break;
            }
        }
        if all_sent {
            announced_to = Some((holder, started));
        }
    }
}

/// Tells the lease holder the stream events [`Forwarder::queue_stream_event`] queued, one at
/// a time and in order, each tried a few times. Runs once per process.
pub async fn forward_stream_events(
    forwarder: std::sync::Arc<Forwarder>,
    reports: std::sync::Arc<crate::reports::Reports>,
    metrics: crate::metrics::Metrics,
) {
    let Some(mut queued) = forwarder
        .queued_stream_events
        .lock()
        .expect("queue lock")
        .take()
    else {
        return;
    };
    while let Some((mesh, node, event)) = queued.recv().await {
        for attempt in 1..=STREAM_EVENT_TRIES {
            // The count as it is when told, not as it was when queued: the last event told
            // for a node carries its latest count.
            let open = reports.liveness.local_streams(&mesh, &node);
            match forwarder
                .forward_stream_count(&mesh, &node, event, open)
                .await
            {
                Ok(()) => break,
                Err(e) if attempt == STREAM_EVENT_TRIES => {
                    metrics.error("forward_stream_event");
                    tracing::warn!(error = %e, %mesh, %node, event = event.as_str(), "telling the lease holder of a stream failed");
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    }
}

/// The lease identity of a replica: `name@host:port`, so others know where to forward.
pub fn lease_identity(name: &str, advertise: Option<&str>) -> String {
    match advertise {
        Some(addr) => format!("{name}@{addr}"),
        None => name.to_owned(),
    }
}

/// Whether a call is a report another replica forwarded: it says so ([`FORWARDED`]) and its
/// client certificate is a replica's ([`is_replica_certificate`]).
pub fn forwarded_by_replica(
    headers: &http::HeaderMap,
    certs: Option<&[tonic::transport::CertificateDer<'static>]>,
    replica_name: &str,
) -> bool {
    headers.contains_key(FORWARDED)
        && certs
            .and_then(|c| c.first())
            .is_some_and(|leaf| is_replica_certificate(leaf, replica_name))
}

/// Whether `der`, the leaf certificate a client presented (already verified against the CA),
/// names the replicas: a DNS subject alternative name equal to `replica_name` (the chart's
/// generated certificate has `wgmesh-controller`, also the `--peer-server-name` replicas
/// check when they connect to each other). The CA may sign other certificates; only this
/// name makes a client a replica whose forwarded reports skip agent authentication.
/// Unparsable input is not a replica.
pub fn is_replica_certificate(der: &[u8], replica_name: &str) -> bool {
    use x509_parser::extensions::GeneralName;
    let Ok((rest, cert)) = x509_parser::parse_x509_certificate(der) else {
        return false;
    };
    if !rest.is_empty() {
        return false;
    }
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return false;
    };
    san.value.general_names.iter().any(
        |name| matches!(name, GeneralName::DNSName(dns) if dns.eq_ignore_ascii_case(replica_name)),
    )
}

/// Stream events waiting to be told to the lease holder.
const STREAM_EVENTS_QUEUED: usize = 65_536;
/// Tries to tell the lease holder of one stream event.
const STREAM_EVENT_TRIES: u32 = 3;

/// An agent's peer stream to this replica opened or closed.
type QueuedStreamEvent = (String, String, StreamEvent);

pub struct Forwarder {
    leases: Api<Lease>,
    lease_name: String,
    own_identity: String,
    tls: ClientTlsConfig,
    cached: tokio::sync::Mutex<Option<(String, MeshServiceClient<Channel>)>>,
    holder: Mutex<Option<(Instant, String)>>,
    /// Stream events, told in the order they happened ([`forward_stream_events`]): the
    /// holder counts each agent's open streams, and a close told before its open would
    /// leave one counted open for good.
    stream_events: tokio::sync::mpsc::Sender<QueuedStreamEvent>,
    queued_stream_events: Mutex<Option<tokio::sync::mpsc::Receiver<QueuedStreamEvent>>>,
}

impl Forwarder {
    /// `tls` authenticates this replica to the others (its serving certificate as a client
    /// certificate) and verifies them.
    pub fn new(
        leases: Api<Lease>,
        lease_name: &str,
        own_identity: &str,
        tls: ClientTlsConfig,
    ) -> Self {
        let (stream_events, queued) = tokio::sync::mpsc::channel(STREAM_EVENTS_QUEUED);
        Forwarder {
            leases,
            lease_name: lease_name.to_owned(),
            own_identity: own_identity.to_owned(),
            tls,
            cached: tokio::sync::Mutex::new(None),
            holder: Mutex::new(None),
            stream_events,
            queued_stream_events: Mutex::new(Some(queued)),
        }
    }

    /// Queues telling the lease holder that `node`'s stream in `mesh` opened or closed;
    /// `false` if the queue is full (the event is lost, as a failed forward was before).
    pub fn queue_stream_event(&self, mesh: &str, node: &str, event: StreamEvent) -> bool {
        self.stream_events
            .try_send((mesh.to_owned(), node.to_owned(), event))
            .is_ok()
    }

    /// The client TLS settings of a replica: the shared CA, and its serving certificate as the
    /// client certificate.
    pub fn client_tls(
        ca_pem: &[u8],
        cert_pem: &[u8],
        key_pem: &[u8],
        server_name: &str,
    ) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca_pem))
            .identity(Identity::from_pem(cert_pem, key_pem))
            .domain_name(server_name)
    }

    /// Sends the report to the lease holder, unless this replica holds the lease.
    pub async fn forward(&self, report: pb::ReportStatusRequest) -> Result<(), Status> {
        self.send(report, None).await
    }

    /// Sends the report (or, with `stream_event`, only that an agent's stream opened or
    /// closed and how many it has open here now) to the lease holder, unless this replica
    /// holds the lease.
    async fn send(
        &self,
        report: pb::ReportStatusRequest,
        stream_event: Option<(StreamEvent, u32)>,
    ) -> Result<(), Status> {
        let holder = self.holder().await?;
        if holder == self.own_identity {
            return Ok(());
        }
        let addr = holder
            .split_once('@')
            .map(|(_, a)| a.to_owned())
            .ok_or_else(|| {
                Status::unavailable(format!("lease holder {holder} advertises no address"))
            })?;
        let mut cached = self.cached.lock().await;
        let client = match cached.as_ref() {
            Some((a, c)) if *a == addr => c.clone(),
            _ => {
                let channel = Channel::from_shared(format!("https://{addr}"))
                    .map_err(|e| Status::internal(e.to_string()))?
                    .tls_config(self.tls.clone())
                    .map_err(|e| Status::internal(e.to_string()))?
                    .connect_timeout(Duration::from_secs(3))
                    .connect_lazy();
                let client = MeshServiceClient::new(channel);
                *cached = Some((addr.clone(), client.clone()));
                client
            }
        };
        drop(cached);
        let mut req = Request::new(report);
        req.metadata_mut()
            .insert(FORWARDED, "1".parse().expect("static metadata"));
        if let Some((event, open)) = stream_event {
            let metadata = req.metadata_mut();
            metadata.insert(
                STREAM_EVENT,
                event.as_str().parse().expect("static metadata"),
            );
            metadata.insert(STREAM_COUNT, open.into());
            // An identity that is no metadata value is left out; the holder then counts
            // the event as before.
            if let Ok(origin) = self.own_identity.parse() {
                metadata.insert(STREAM_ORIGIN, origin);
            }
        }
        req.set_timeout(Duration::from_secs(5));
        let mut client = client;
        client.report_status(req).await.map(|_| ())
    }

    /// Tells the lease holder that `node`'s agent has `open` streams in `mesh` here now
    /// (after `event`).
    async fn forward_stream_count(
        &self,
        mesh: &str,
        node: &str,
        event: StreamEvent,
        open: u32,
    ) -> Result<(), Status> {
        let report = pb::ReportStatusRequest {
            node: node.to_owned(),
            mesh: mesh.to_owned(),
            ..Default::default()
        };
        self.send(report, Some((event, open))).await
    }

    /// The lease holder's identity (`name@host:port`), as last read (at most 5 s old).
    pub async fn holder(&self) -> Result<String, Status> {
        if let Some((at, h)) = self.holder.lock().expect("holder lock").clone()
            && at.elapsed() < HOLDER_TTL
        {
            return Ok(h);
        }
        let lease = self
            .leases
            .get_opt(&self.lease_name)
            .await
            .map_err(|e| Status::unavailable(format!("reading the lease: {e}")))?;
        let holder = lease
            .and_then(|l| l.spec)
            .and_then(|s| s.holder_identity)
            .ok_or_else(|| Status::unavailable("no replica holds the lease"))?;
        *self.holder.lock().expect("holder lock") = Some((Instant::now(), holder.clone()));
        Ok(holder)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(sans: &[&str]) -> Vec<u8> {
        let names = sans.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        rcgen::generate_simple_self_signed(names)
            .expect("a test certificate")
            .cert
            .der()
            .to_vec()
    }

    #[test]
    fn replica_certificates() {
        let chart = cert(&[
            "wgmesh-controller",
            "wgmesh-controller.wgmesh-system",
            "wgmesh-controller.wgmesh-system.svc",
        ]);
        let only_service = cert(&["wgmesh-controller.wgmesh-system.svc"]);
        let other = cert(&["intruder.example"]);
        let no_san = cert(&[]);
        let ip_only = cert(&["127.0.0.1"]);
        let mut trailing = chart.clone();
        trailing.push(0);
        let cases: &[(&str, &[u8], &str, bool)] = &[
            ("the chart's certificate", &chart, "wgmesh-controller", true),
            ("case does not matter", &chart, "WGMESH-Controller", true),
            ("another configured name", &chart, "localhost", false),
            (
                "only the service name",
                &only_service,
                "wgmesh-controller",
                false,
            ),
            ("another SAN", &other, "wgmesh-controller", false),
            ("no SAN", &no_san, "wgmesh-controller", false),
            ("an IP SAN only", &ip_only, "127.0.0.1", false),
            ("garbage", b"not a certificate", "wgmesh-controller", false),
            ("empty", b"", "wgmesh-controller", false),
            (
                "truncated",
                &chart[..chart.len() / 2],
                "wgmesh-controller",
                false,
            ),
            ("trailing bytes", &trailing, "wgmesh-controller", false),
        ];
        for (what, der, name, want) in cases {
            assert_eq!(is_replica_certificate(der, name), *want, "{what}");
        }
    }

    #[test]
    fn identities() {
        assert_eq!(lease_identity("c1", None), "c1");
        assert_eq!(
            lease_identity("c1", Some("10.0.0.5:9443")),
            "c1@10.0.0.5:9443"
        );
    }
}
