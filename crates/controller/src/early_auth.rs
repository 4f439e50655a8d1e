//! Authenticates a gRPC call from its headers before its body is read. tonic reads a whole
//! request message (up to [`crate::MAX_REQUEST_BYTES`]) before a handler runs, so without this
//! anyone who can reach the port could make us buffer megabytes per stream with no token at
//! all. Here a call must carry a token of the agents' account (reviewed, and cached for the
//! handler, which then checks the node it names), or come from another replica (its client
//! certificate); anything else is answered at once, its body never read.

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tonic::server::NamedService;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use crate::auth::Authenticator;
use crate::forward::forwarded_by_replica;

/// The gRPC service `S`, behind authentication from the headers.
#[derive(Clone)]
pub struct AuthenticatedFirst<S> {
    pub inner: S,
    pub auth: Arc<Authenticator>,
    /// The name in the replicas' client certificates (`--peer-server-name`).
    pub replica_name: String,
}

impl<S: NamedService> NamedService for AuthenticatedFirst<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tonic::codegen::Service<http::Request<B>> for AuthenticatedFirst<S>
where
    S: tonic::codegen::Service<
            http::Request<B>,
            Response = http::Response<tonic::body::Body>,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // The clone may not be ready; the one `poll_ready` readied is taken (tower's rule).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let auth = self.auth.clone();
        let replica_name = self.replica_name.clone();
        Box::pin(async move {
            let tls = request.extensions().get::<TlsConnectInfo<TcpConnectInfo>>();
            let source: Option<IpAddr> = tls
                .and_then(|t| t.get_ref().remote_addr())
                .or_else(|| {
                    request
                        .extensions()
                        .get::<TcpConnectInfo>()
                        .and_then(|t| t.remote_addr())
                })
                .map(|a| a.ip());
            let certs = tls.and_then(|t| t.peer_certs());
            let from_replica = forwarded_by_replica(
                request.headers(),
                certs.as_deref().map(Vec::as_slice),
                &replica_name,
            );
            if !from_replica
                && let Err(status) = auth.authenticate_agent(request.headers(), source).await
            {
                return Ok(status.into_http());
            }
            inner.call(request).await
        })
    }
}
